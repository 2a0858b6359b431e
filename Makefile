# Set-up and entry points. `make test` alone creates .venv (Python 3.10) and installs everything.
# Override the interpreter with `make test PYTHON=/path/to/python3.10`.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.10 $$(pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10 \
	/usr/local/bin/python3.10 /usr/bin/python3.10; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-compare bench lint format clean

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
	rm -rf $(VENV) output
