"""The built-in synthetic_shapes datasets: files, cache location and reuse, lazy registration."""

import hashlib
import json
from pathlib import Path

import cv2
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from sparse_rcnn import builtin_datasets as bd

SMALL = dict(num_images=20, image_size=64)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    json_file, image_root = bd.ensure_generated("val", root=root, seed=3, **SMALL)
    with open(json_file) as f:
        return root, json.load(f), Path(image_root)


@pytest.fixture
def synthetic_registration(tmp_path, monkeypatch):
    """Register synthetic_shapes_{train,val} with tiny splits in a temporary cache; restore after."""
    names = ["synthetic_shapes_train", "synthetic_shapes_val"]
    saved = {}
    for name in names:
        if name in DatasetCatalog.list():
            saved[name] = (
                DatasetCatalog[name],
                MetadataCatalog.get(name),
                bd._REGISTERED.get(name),
            )
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    monkeypatch.setenv("SPARSE_RCNN_DATASETS", str(tmp_path))
    registered = bd.register_synthetic_shapes(splits={"train": 12, "val": 10}, image_size=64)
    yield tmp_path, registered
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        bd._REGISTERED.pop(name, None)
        if name in saved:
            func, meta, spec = saved[name]
            DatasetCatalog.register(name, func)
            MetadataCatalog[name] = meta
            if spec is not None:
                bd._REGISTERED[name] = spec


def test_same_seed_same_files_other_seed_differs(tmp_path, small_split):
    _, coco, image_root = small_split
    json_b, root_b = bd.ensure_generated("val", root=tmp_path / "b", seed=3, **SMALL)
    with open(json_b) as f:
        assert json.load(f) == coco
    assert _digest(Path(root_b)) == _digest(image_root)
    json_c, root_c = bd.ensure_generated("val", root=tmp_path / "c", seed=4, **SMALL)
    with open(json_c) as f:
        assert json.load(f)["annotations"] != coco["annotations"]
    assert _digest(Path(root_c)) != _digest(image_root)
    # Splits differ for the same seed.
    _, root_d = bd.ensure_generated("train", root=tmp_path / "c", seed=3, **SMALL)
    assert _digest(Path(root_d)) != _digest(image_root)


def test_coco_json_and_images(small_split):
    _, coco, image_root = small_split
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert [c["name"] for c in coco["categories"]] == list(bd.SYNTHETIC_SHAPES_CLASSES)
    assert len(coco["images"]) == 20 and len(list(image_root.iterdir())) == 20
    ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    for im in coco["images"]:
        image = cv2.imread(str(image_root / im["file_name"]))
        assert image.shape == (im["height"], im["width"], 3) == (64, 64, 3)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3)
        assert w >= 2 and h >= 2
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert 0 < a["area"] <= w * h


def test_cache_reuse_and_parameter_change(tmp_path):
    json_file, image_root = bd.ensure_generated("val", root=tmp_path, num_images=5, image_size=32)
    mtime = Path(json_file).stat().st_mtime_ns
    assert bd.ensure_generated("val", root=tmp_path, num_images=5, image_size=32) == (
        json_file,
        image_root,
    )
    assert Path(json_file).stat().st_mtime_ns == mtime  # not regenerated
    json_2, root_2 = bd.ensure_generated("val", root=tmp_path, num_images=7, image_size=32)
    assert json_2 == json_file and root_2 != image_root
    with open(json_2) as f:
        assert len(json.load(f)["images"]) == 7
    assert not Path(image_root).exists()  # the stale images were removed
    # No temporary folders are left behind.
    assert not [p for p in Path(json_file).parent.iterdir() if p.name.startswith(".tmp")]


def test_default_cache_dir(monkeypatch, tmp_path):
    """$SPARSE_RCNN_DATASETS, else Detectron2's $DETECTRON2_DATASETS, else ./datasets: never the
    package's folder (site-packages for an installed package)."""
    monkeypatch.setenv("SPARSE_RCNN_DATASETS", str(tmp_path / "ours"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert bd.default_cache_dir() == tmp_path / "ours"
    monkeypatch.delenv("SPARSE_RCNN_DATASETS")
    assert bd.default_cache_dir() == tmp_path / "d2"
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    assert bd.default_cache_dir() == tmp_path / "datasets"  # absolute, read now
    package = Path(bd.__file__).resolve().parent
    assert package not in bd.default_cache_dir().parents


def test_registered_root_does_not_follow_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSE_RCNN_DATASETS", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", "rel")
    monkeypatch.chdir(tmp_path)
    (name,) = bd.register_synthetic_shapes(splits={"x": 2}, image_size=32, prefix="cwd_test")
    try:
        monkeypatch.chdir(tmp_path.parent)
        assert MetadataCatalog.get(name).json_file == str(tmp_path / "rel/synthetic_shapes/x.json")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        bd._REGISTERED.pop(name, None)


def test_registration_is_lazy_and_loads(synthetic_registration):
    root, registered = synthetic_registration
    assert registered == ["synthetic_shapes_train", "synthetic_shapes_val"]
    meta = MetadataCatalog.get("synthetic_shapes_val")
    assert meta.thing_classes == ["rectangle", "ellipse", "triangle"]
    assert meta.evaluator_type == "coco"
    assert Path(meta.json_file) == root / "synthetic_shapes" / "val.json"
    assert not (root / "synthetic_shapes").exists()  # registering generated nothing
    # Registering again is a no-op (Detectron2 would raise on a duplicate).
    assert bd.register_synthetic_shapes(splits={"val": 10}, image_size=64) == []

    dicts = DatasetCatalog.get("synthetic_shapes_val")
    assert Path(meta.json_file).is_file() and Path(meta.image_root).is_dir()
    assert not (root / "synthetic_shapes" / "train.json").exists()  # only the loaded split
    assert len(dicts) == 10
    classes = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert classes <= {0, 1, 2} and classes
    for d in dicts:
        assert Path(d["file_name"]).is_file()
        assert (d["height"], d["width"]) == (64, 64)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}


def test_prepare_generates_for_evaluation(synthetic_registration):
    root, _ = synthetic_registration
    ready = bd.prepare_synthetic_shapes(["synthetic_shapes_train", "coco_2017_val", "unknown"])
    assert ready == ["synthetic_shapes_train"]
    assert bd.prepare_builtin_dataset("synthetic_shapes_train")
    assert not bd.prepare_builtin_dataset("coco_2017_val")
    json_file = MetadataCatalog.get("synthetic_shapes_train").json_file
    assert Path(json_file).is_file()
    assert not (root / "synthetic_shapes" / "val.json").exists()
    # COCOEvaluator can read the json now.
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator("synthetic_shapes_train", tasks=("bbox",), distributed=False)
    assert len(evaluator._coco_api.getImgIds()) == 12


def _generate_in_child(root):
    bd.ensure_generated("train", root=root, num_images=30, image_size=48)


def test_concurrent_generation_is_safe(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_generate_in_child, args=(tmp_path,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    json_file, image_root = bd.synthetic_shapes_paths(
        "train", root=tmp_path, num_images=30, image_size=48
    )
    with open(json_file) as f:
        coco = json.load(f)
    assert sorted(p.name for p in Path(image_root).iterdir()) == sorted(
        im["file_name"] for im in coco["images"]
    )
    # No temporary folders left: only the json and its image folder.
    names = {p.name for p in (tmp_path / "synthetic_shapes").iterdir()}
    assert names == {Path(image_root).name, "train.json"}


def test_older_cached_split_is_regenerated_with_masks(tmp_path):
    """A split cached by an older generator (json without masks) is written again: same images,
    now with instance masks; the old image folder is removed."""
    json_file, image_root = bd.ensure_generated("val", root=tmp_path, num_images=6, image_size=48)
    with open(json_file) as f:
        coco = json.load(f)
    old = dict(
        coco["info"]["params"], generator_version=coco["info"]["params"]["generator_version"] - 1
    )
    old_root = Path(json_file).parent / bd._image_dir_name(old)
    Path(image_root).rename(old_root)
    coco["info"]["params"] = old
    for a in coco["annotations"]:
        del a["segmentation"]
    with open(json_file, "w") as f:
        json.dump(coco, f)

    json_new, root_new = bd.ensure_generated("val", root=tmp_path, num_images=6, image_size=48)
    assert root_new == image_root and not old_root.exists()
    with open(json_new) as f:
        new = json.load(f)
    assert all("segmentation" in a for a in new["annotations"])
    strip = lambda a: {k: v for k, v in a.items() if k != "segmentation"}  # noqa: E731
    assert [strip(a) for a in new["annotations"]] == coco["annotations"]


def test_loaded_split_gives_masks_to_a_mask_mapper(tmp_path):
    """load_coco_json keeps the RLE; the mapper of a MODEL.MASK_ON config turns it into BitMasks
    that cover the objects' pixels inside their boxes."""
    from detectron2.data.datasets import load_coco_json

    from conftest import make_cfg
    from sparse_rcnn.dataset_mapper import SparseRCNNDatasetMapper

    json_file, image_root = bd.ensure_generated("val", root=tmp_path, num_images=8, image_size=64)
    dicts = load_coco_json(json_file, image_root, "masks_check")
    cfg = make_cfg(
        opts=["MODEL.MASK_ON", "True", "INPUT.MASK_FORMAT", "bitmask", "INPUT.MIN_SIZE_TEST", 64]
    )
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True, augmentations=[], image_format="RGB")
    checked = 0
    for record in dicts:
        out = mapper(record)
        instances = out["instances"]
        assert len(instances) == len(record["annotations"])
        if not len(instances):
            continue
        masks = instances.gt_masks.tensor
        for mask, box in zip(masks, instances.gt_boxes.tensor):
            x0, y0, x1, y1 = box.long().tolist()
            assert mask.any() and not mask[:, :x0].any() and not mask[:, x1:].any()
            assert not mask[:y0].any() and not mask[y1:].any()
            checked += 1
    assert checked >= 8
