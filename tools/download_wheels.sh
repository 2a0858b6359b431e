#!/usr/bin/env bash
# Wheels for a machine without a package index that already runs Python 3.12 with torch,
# torchvision, numpy, scipy, OpenCV and most of the scientific stack (this workplace's GPU
# machines, say): the packages it lacks, at the versions of requirements-latest.txt, and the
# sal-detectron2 wheel whose Python files tools/install_detectron2.py installs.
#
#   bash tools/download_wheels.sh .whl              # here, where pip reaches the index
#   # there, in a copy of the repository with .whl/ (a few MB):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   python3 tools/install_detectron2.py --wheel .whl/detectron2/sal_detectron2-*.whl --target /tmp/site
#   PYTHONPATH=/tmp/site:projects python3 -m pytest tests/...
#
# PACKAGES overrides the list (names as in requirements-latest.txt); PYTHON is a Python of the
# target's version and platform (default: .venv-latest's, made by `make venv-latest`), with which
# `pip wheel` builds the packages published as sources only (fvcore, iopath, antlr4).
set -euo pipefail
dest=${1:?usage: tools/download_wheels.sh DEST}
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv-latest/bin/python}
packages=${PACKAGES:-fvcore iopath yacs omegaconf hydra-core antlr4-python3-runtime pycocotools termcolor}
mkdir -p "$dest/detectron2"
: > "$dest/requirements.txt"
for name in $packages; do
    pinned=$(grep -i -E "^${name}==" requirements-latest.txt) || {
        echo "error: $name is not pinned in requirements-latest.txt" >&2
        exit 1
    }
    echo "$pinned" >> "$dest/requirements.txt"
done
"$python" -m pip wheel -q --no-deps -w "$dest" -r "$dest/requirements.txt"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$dest/detectron2" sal-detectron2==0.7.2
echo "$(ls "$dest"/*.whl | wc -l) wheels in $dest, Detectron2's in $dest/detectron2"
