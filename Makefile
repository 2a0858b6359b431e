# Set-up and entry points. `make test` alone creates .venv (the pinned stack: Python 3.10, torch
# 2.3.1, the sal-detectron2 wheel) and installs everything; `make test-latest` creates .venv-latest
# (the current stack: Python 3.12, the newest torch, numpy 2, Detectron2's Python files).
# Override the interpreters with `make test PYTHON=/path/to/python3.10` and
# `make test-latest PYTHON_LATEST=/path/to/python3.12`.
SHELL := /bin/bash
find_python = $(shell for p in python$(1) $$(pyenv root 2>/dev/null)/versions/$(1)*/bin/python$(1) \
	/usr/local/bin/python$(1) /usr/bin/python$(1); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == ($(subst .,$(comma) ,$(1)))' >/dev/null 2>&1 \
	&& { echo "$$p"; break; }; done)
comma := ,
PYTHON ?= $(call find_python,3.10)
PYTHON_LATEST ?= $(call find_python,3.12)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed

.PHONY: venv venv-latest test test-latest lock-latest demo demo-compare bench lint format clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	@if [ -z "$(PYTHON)" ]; then echo "error: no Python 3.10 found; pass PYTHON=/path/to/python3.10" >&2; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The current stack. Detectron2 publishes no wheel for it: tools/install_detectron2.py copies the
# Python files of the sal-detectron2 wheel into the environment, without its compiled _C.
venv-latest: $(STAMP_LATEST)

$(STAMP_LATEST): requirements-latest.txt setup.py tools/install_detectron2.py
	@if [ -z "$(PYTHON_LATEST)" ]; then echo "error: no Python 3.12 found; pass PYTHON_LATEST=/path/to/python3.12" >&2; exit 1; fi
	@[ -x $(PY_LATEST) ] || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip wheel setuptools
	$(PY_LATEST) -m pip install -q -r requirements-latest.txt
	$(PY_LATEST) tools/install_detectron2.py
	$(PY_LATEST) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	$(PY_LATEST) -m pytest -q tests

# Re-resolve the current stack from requirements-latest.in (the newest versions the index serves)
# into requirements-latest.txt; then `make test-latest` and commit both files if it passes.
lock-latest:
	@if [ -z "$(PYTHON_LATEST)" ]; then echo "error: no Python 3.12 found; pass PYTHON_LATEST=/path/to/python3.12" >&2; exit 1; fi
	rm -rf .venv-lock && $(PYTHON_LATEST) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -r requirements-latest.in
	{ sed -n '1,3p' requirements-latest.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
		| grep -v -E '^(nvidia-|cuda-|triton|setuptools)'; } > requirements-latest.txt.new
	mv requirements-latest.txt.new requirements-latest.txt && rm -rf .venv-lock

# The main job: train Sparse R-CNN with Dynamic Sparse R-CNN's label assignment from scratch on the
# built-in synthetic dataset (generated on first use into datasets/synthetic_shapes), evaluate with
# COCOEvaluator (every stage's AP too), draw predictions beside the ground truth, report.
DEMO_CONFIG := configs/dynamic_sparse_rcnn_dla_only_quick_cpu.yaml
DEMO_OUT := output/demo_cpu
demo: $(STAMP)
	$(PY) train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUT) \
		MODEL.SPARSE_RCNN.EVAL_PER_STAGE True
	$(PY) -m sparse_rcnn.demo --config-file $(DEMO_CONFIG) --output $(DEMO_OUT)/vis \
		--dataset synthetic_shapes_val --num-images 8 \
		--opts MODEL.WEIGHTS $(DEMO_OUT)/model_final.pth
	$(PY) -m sparse_rcnn.report $(DEMO_OUT)

# Sparse R-CNN and the headline model (Dynamic Sparse R-CNN's label assignment) trained with the
# same budget (the main job's model, 1300 iterations each), side by side with COCO AP without and
# with NMS 0.7 at test time: about 25 minutes on 2 cores; records in output/compare/. Any variants
# of tools/ablate_dynamic.py: make demo-compare VARIANTS="sparse dla dla_two_losses dpg dynamic"
VARIANTS ?= sparse dla_two_losses
demo-compare: $(STAMP)
	$(PY) tools/ablate_dynamic.py --variants $(VARIANTS) --output-root output/compare \
		--out output/compare/records.jsonl

# Quick CPU versions of every benchmark (a few minutes); JSON records go to output/bench/.
bench: $(STAMP)
	bash benchmarks/run_all.sh $(PY)

# Formatting and lint (settings in pyproject.toml): ruff (pycodestyle, pyflakes, import order),
# black and isort at line length 100. `make format` applies black and isort.
LINT_PATHS := projects tests benchmarks tools train_net.py setup.py
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/black --check $(LINT_PATHS)
	$(VENV)/bin/isort --check-only $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/isort $(LINT_PATHS)
	$(VENV)/bin/black $(LINT_PATHS)

clean:
	rm -rf $(VENV) $(VENV_LATEST) output
