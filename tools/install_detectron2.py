#!/usr/bin/env python
"""Install Detectron2's Python package, without its compiled ``_C`` extension, into an environment
whose Python or torch no Detectron2 wheel fits (Python 3.12+, a current torch).

Detectron2 publishes no wheels; the one build on the package index, ``sal-detectron2`` 0.7.2, is
for Python 3.10 and torch 2.3. Its Python files run on newer versions: this project imports only
``detectron2.*``, never ``detectron2._C`` (RoIAlign goes through torchvision, COCOEvaluator falls
back to pycocotools), as Detectron2's own CI does in its import test without ``_C``. This script
downloads that wheel (``pip download --no-deps``, any Python tag) or takes one given with
``--wheel``, and copies its ``detectron2/`` folder, minus ``_C*.so``, into ``--target`` (default:
the running interpreter's site-packages). Detectron2's pure-Python dependencies are not installed
here: they are in ``requirements-latest.txt``.

    python tools/install_detectron2.py                      # into this environment
    python tools/install_detectron2.py --target /tmp/site   # a folder to put on PYTHONPATH
    python tools/install_detectron2.py --wheel dl/sal_detectron2-0.7.2-cp310-none-any.whl

A user who builds Detectron2 from source on their own torch does not need this script.
"""

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

WHEEL_REQUIREMENT = "sal-detectron2==0.7.2"
PACKAGE = "detectron2/"


def download_wheel(requirement: str, folder: str) -> str:
    """Download the wheel of ``requirement`` (no dependencies) into ``folder``; returns its path.

    The only published build is tagged for CPython 3.10; ``--python-version 3.10`` lets pip fetch
    it from any interpreter (nothing of it is installed by pip).
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.10", "--dest", folder, requirement],
        check=True,
    )  # fmt: skip
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {folder}, found {wheels}")
    return wheels[0]


def is_compiled_extension(name: str) -> bool:
    """Whether a wheel member is Detectron2's compiled ``_C`` (``detectron2/_C.cpython-*.so``)."""
    base = os.path.basename(name)
    return base.startswith("_C.") and base.endswith((".so", ".pyd"))


def install(wheel: str, target: str) -> int:
    """Copy ``detectron2/`` of ``wheel`` into ``target`` without ``_C``; returns the file count.

    An earlier copy in ``target`` is replaced file by file (the package is the same version).
    """
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if not name.startswith(PACKAGE) or name.endswith("/") or is_compiled_extension(name):
                continue
            destination = os.path.join(target, *name.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with archive.open(member) as src, open(destination, "wb") as dst:
                dst.write(src.read())
            count += 1
    if count == 0:
        raise RuntimeError(f"{wheel} holds no {PACKAGE} folder")
    return count


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="a downloaded sal-detectron2 wheel (default: download)")
    parser.add_argument(
        "--target", default=sysconfig.get_paths()["purelib"], help="where detectron2/ goes"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(WHEEL_REQUIREMENT, tmp)
        count = install(wheel, args.target)
    print(f"Installed Detectron2's Python package ({count} files, no _C) into {args.target}")
    return args.target


if __name__ == "__main__":
    main()
