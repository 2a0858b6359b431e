"""The documentation names only things that exist, and the code keeps no lab notebook.

README.md and docs/*.md: every relative link (and its #anchor) resolves, every repository path
named in backticks or code blocks exists, every docs page is one click from the README. The
package, the configs and train_net.py carry no measurement stamps (dates, clock times).
"""

import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
# Top-level folders and files of the repository that docs name as paths. Generated folders
# (output/, datasets/, out/, .venv/) are not among them: paths there are examples, not files.
REPO_FOLDERS = ("configs", "projects", "benchmarks", "tools", "tests", "docs")
# Paths in other projects that the docs name as such (Detectron2's tools and configs).
EXTERNAL_PATHS = {
    "tools/deploy/export_model.py",
    "tools/train_net.py",
    "tools/lazyconfig_train_net.py",
    "configs/new_baselines/",
    # mmdetection's QueryInst configs (docs/queryinst.md cites them)
    "configs/queryinst/*.py",
    "configs/queryinst/README.md",
    "configs/queryinst/queryinst_r50_fpn_1x_coco.py",
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
PATH_TOKEN = re.compile(r"^[\w.*-]+(/[\w.*-]*)+$")
# A measurement stamp: a date (2026-12-02) or a clock time followed by a space (05:24 ).
STAMP = re.compile(r"20[0-9]{2}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2} ")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = CODE_BLOCK.sub("", path.read_text())
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path):
    text = CODE_BLOCK.sub("", path.read_text())
    for target in LINK.findall(text):
        if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            yield target


def _repo_paths(path: Path):
    """Tokens that look like repository paths, in code spans and code blocks."""
    text = path.read_text()
    chunks = CODE_SPAN.findall(CODE_BLOCK.sub("", text)) + CODE_BLOCK.findall(text)
    for chunk in chunks:
        for token in re.split(r"[\s=(),\"']+", chunk):
            token = token.split("::")[0].rstrip(".,:;")
            if not PATH_TOKEN.match(token) or token in EXTERNAL_PATHS:
                continue
            top = token.split("/")[0]
            if top in REPO_FOLDERS or top == "sparse_rcnn":
                yield token


def _resolve(token: str) -> Path:
    if token.startswith("sparse_rcnn/configs"):  # the configs inside the installed package
        return REPO / token.replace("sparse_rcnn/configs", "configs", 1)
    if token.startswith("sparse_rcnn/"):
        return REPO / "projects" / token
    return REPO / token


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, f"{doc.name}: broken links (fix the link or the heading):\n" + "\n".join(
        broken
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_repository_paths_exist(doc):
    missing = sorted(
        {t for t in _repo_paths(doc) if not glob.glob(str(_resolve(t)).replace("**", "*"))}
    )
    assert not missing, (
        f"{doc.name} names paths that do not exist (rename them, or add a path of another "
        f"project to EXTERNAL_PATHS): {missing}"
    )


def test_path_checker_sees_paths():
    """The checks above find what they look for (a guard against a regex that matches nothing)."""
    readme = REPO / "README.md"
    assert "configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml" in set(_repo_paths(readme))
    assert "docs/getting_started.md#install" in set(_links(readme))
    assert "the-main-job-make-demo" in _anchors(REPO / "docs" / "getting_started.md")
    assert _resolve("sparse_rcnn/ota.py") == REPO / "projects" / "sparse_rcnn" / "ota.py"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in _links(REPO / "README.md")}
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages without a link in README.md's documentation table: {unlinked}"


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details to docs/"


def test_no_measurement_stamps_in_code_and_configs():
    """What `grep -rE "20[0-9]{2}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2} " projects configs
    train_net.py` checks, over the text files: measurements go to docs/benchmarks.md."""
    files = [REPO / "train_net.py"]
    for folder in ("projects", "configs"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix != ".pyc"]
    stamps = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if STAMP.search(line):
                stamps.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not stamps, "dates or clock times in code or configs (move them to docs):\n" + "\n".join(
        stamps
    )
