"""Your own COCO-format dataset from the command line (``sparse_rcnn.custom_datasets``): registration
and its errors, the class count taken from the json, train_net's wiring, and ``--register-coco``
end to end through training, evaluation, the demo (class names, threshold) and export, on a
one-class COCO json generated in a temporary folder. Nothing is generated as a side effect."""

import json
import math
import re
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.engine import default_argument_parser

from conftest import CONFIG_DIR, REPO_ROOT, TINY_CONFIG, make_cfg
from sparse_rcnn import builtin_datasets, demo, export as sparse_export
from sparse_rcnn.custom_datasets import (
    DatasetNotRegisteredError,
    add_register_coco_argument,
    dataset_class_names,
    first_image,
    num_classes_from_dataset,
    opts_with_dataset_num_classes,
    register_coco,
    register_from_args,
)
from sparse_rcnn.predictor import SparseRCNNPredictor
from sparse_rcnn.synthetic_shapes import generate_split

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402

MAX_ITER = 10


def write_coco(folder, split, num_images, categories, category_of_shape):
    """A COCO json of ``num_images`` generated images under ``folder/split/``, its shapes
    (category ids 1, 2, 3) relabelled by ``category_of_shape``; returns (json, image_root)."""
    image_root = folder / split
    coco = generate_split(image_root, split, num_images, image_size=96)
    for annotation in coco["annotations"]:
        annotation["category_id"] = category_of_shape[annotation["category_id"]]
    coco["categories"] = categories
    json_file = folder / f"{split}.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(image_root)


TREES = [{"id": 5, "name": "tree"}]
ALL_TREES = {1: 5, 2: 5, 3: 5}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """trees_train (16 images) and trees_val (4): one class "tree" with COCO id 5; not yet
    registered (the commands register them)."""
    folder = tmp_path_factory.mktemp("trees")
    files = {
        "trees_train": write_coco(folder, "train", 16, TREES, ALL_TREES),
        "trees_val": write_coco(folder, "val", 4, TREES, ALL_TREES),
    }
    yield files
    for name in files:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def register_args(trees, *names):
    return [a for name in names for a in ("--register-coco", name, *trees[name])]


@pytest.fixture
def no_generation(monkeypatch):
    """Fail on any generation of the built-in dataset (a side effect of loading it)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the built-in dataset was generated: {args} {kwargs}")

    monkeypatch.setattr(builtin_datasets, "ensure_generated", refuse)


@pytest.fixture(autouse=True)
def _forget(request):
    """Names that a test registers for itself, unregistered afterwards."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        if name not in ("trees_train", "trees_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# --- registration -----------------------------------------------------------------------------


def test_register_coco_is_detectron2s_with_absolute_paths_and_idempotent(tmp_path, monkeypatch):
    json_file, image_root = write_coco(tmp_path, "val", 2, TREES, ALL_TREES)
    monkeypatch.chdir(tmp_path)
    assert register_coco("reg_same", "val.json", "val") == "reg_same"
    metadata = MetadataCatalog.get("reg_same")
    assert (metadata.json_file, metadata.image_root) == (json_file, image_root)
    assert metadata.evaluator_type == "coco"
    register_coco("reg_same", json_file, image_root + "/")  # the same files: nothing happens
    records = DatasetCatalog.get("reg_same")
    assert [r["file_name"] for r in records] == [
        f"{image_root}/000001.png",
        f"{image_root}/000002.png",
    ]


def test_register_coco_errors_name_the_problem(tmp_path):
    json_file, image_root = write_coco(tmp_path, "val", 1, TREES, ALL_TREES)
    with pytest.raises(FileNotFoundError, match="the COCO json nope.json does not exist"):
        register_coco("reg_err", "nope.json", image_root)
    with pytest.raises(FileNotFoundError, match="the image folder nope/ does not exist"):
        register_coco("reg_err", json_file, "nope/")
    assert "reg_err" not in DatasetCatalog.list()
    register_coco("reg_err", json_file, image_root)
    other_json, _ = write_coco(tmp_path, "other", 1, TREES, ALL_TREES)
    with pytest.raises(ValueError, match=re.escape(f"already registered with json {json_file}")):
        register_coco("reg_err", other_json, image_root)
    with pytest.raises(ValueError, match="'synthetic_shapes_val' is already registered with json"):
        register_coco("synthetic_shapes_val", json_file, image_root)
    DatasetCatalog.register("reg_dicts", lambda: [])
    with pytest.raises(ValueError, match=r"already registered \(a dataset without a COCO json\)"):
        register_coco("reg_dicts", json_file, image_root)


def test_register_coco_argument_is_repeatable_before_the_options(tmp_path):
    a = write_coco(tmp_path, "a", 1, TREES, ALL_TREES)
    b = write_coco(tmp_path, "b", 1, TREES, ALL_TREES)
    parser = add_register_coco_argument(default_argument_parser())
    args = parser.parse_args(
        ["--config-file", "x.yaml", "--register-coco", "arg_a", *a]
        + ["--register-coco", "arg_b", *b, "DATASETS.TRAIN", "('arg_a',)"]
    )
    assert args.register_coco == [["arg_a", *a], ["arg_b", *b]]
    assert args.opts == ["DATASETS.TRAIN", "('arg_a',)"]
    assert register_from_args(args) == ["arg_a", "arg_b"]
    assert parser.parse_args(["--config-file", "x.yaml"]).register_coco == []


# --- the class count --------------------------------------------------------------------------


def test_class_names_come_from_the_json_in_id_order_as_detectron2_maps_them(tmp_path):
    # Ids 30, 4, 17: Detectron2 maps them to 0, 1, 2 in id order (4 -> 0, 17 -> 1, 30 -> 2).
    categories = [{"id": 30, "name": "pine"}, {"id": 4, "name": "oak"}, {"id": 17, "name": "elm"}]
    json_file, image_root = write_coco(tmp_path, "val", 3, categories, {1: 30, 2: 4, 3: 17})
    register_coco("three_trees", json_file, image_root)
    assert num_classes_from_dataset("three_trees") == 3
    assert dataset_class_names("three_trees") == ["oak", "elm", "pine"]
    # Loading the dataset sets the same thing_classes (else MetadataCatalog would refuse it).
    records = load_coco_json(json_file, image_root, "three_trees")
    assert MetadataCatalog.get("three_trees").thing_classes == ["oak", "elm", "pine"]
    ids = {a["category_id"] for r in records for a in r["annotations"]}
    assert ids <= {0, 1, 2}


def test_class_count_errors(tmp_path):
    with pytest.raises(DatasetNotRegisteredError, match="--register-coco no_such_set path/to"):
        num_classes_from_dataset("no_such_set")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / "images").mkdir()
    register_coco("no_categories", str(bad), str(tmp_path / "images"))
    with pytest.raises(ValueError, match="no 'categories' list"):
        num_classes_from_dataset("no_categories")


def test_class_count_of_a_builtin_dataset_generates_nothing(no_generation):
    assert num_classes_from_dataset("synthetic_shapes_train") == 3


def test_yaml_options_get_the_class_count_unless_they_give_it(trees):
    register_coco("trees_train", *trees["trees_train"])
    train = ["DATASETS.TRAIN", "('trees_train',)"]
    assert opts_with_dataset_num_classes(TINY_CONFIG, train) == train + [
        "MODEL.SPARSE_RCNN.NUM_CLASSES",
        "1",
    ]
    given = train + ["MODEL.SPARSE_RCNN.NUM_CLASSES", "4"]
    assert opts_with_dataset_num_classes(TINY_CONFIG, given) == given
    # The built-in training set of the config: 3 classes, as the config says.
    assert opts_with_dataset_num_classes(TINY_CONFIG, []) == []
    # An unknown training set: unchanged (the pre-flight dataset checks report it).
    unknown = ["DATASETS.TRAIN", "('not_registered_anywhere',)"]
    assert opts_with_dataset_num_classes(TINY_CONFIG, unknown) == unknown


def test_lazy_config_overrides_get_the_class_count_unless_they_give_it(trees):
    register_coco("trees_train", *trees["trees_train"])
    config = CONFIG_DIR / "sparse_rcnn_quick_cpu.py"
    train = ["dataloader.train.dataset.names=trees_train"]
    opts = opts_with_dataset_num_classes(config, train)
    assert opts == train + ["model.num_classes=1"]
    assert LazyConfig.apply_overrides(LazyConfig.load(str(config)), opts).model.num_classes == 1
    given = train + ["model.num_classes=2"]
    assert opts_with_dataset_num_classes(config, given) == given


def test_training_sets_that_disagree_keep_the_configs_count(trees, tmp_path):
    register_coco("trees_train", *trees["trees_train"])
    two = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    register_coco("two_classes", *write_coco(tmp_path, "two", 2, two, {1: 1, 2: 2, 3: 2}))
    opts = ["DATASETS.TRAIN", "('trees_train', 'two_classes')"]
    assert opts_with_dataset_num_classes(TINY_CONFIG, opts) == opts


# --- end to end: train_net, evaluation, demo, export ------------------------------------------


def run_train_net(argv):
    """train_net.py as its command line runs it (``--register-coco`` parsed by its parser; its
    ``main`` registers the datasets and takes the class count before the config is read)."""
    args = train_net.get_parser().parse_args(argv)
    torch.set_num_threads(1)
    return train_net.main(args)


def test_train_net_runs_from_the_installed_package_with_register_coco():
    """``python -m sparse_rcnn.train_net`` is the top-level train_net.py (which imports it), with
    ``--register-coco`` in its parser."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sparse_rcnn.train_net", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--register-coco NAME JSON IMAGE_ROOT" in result.stdout
    from sparse_rcnn import train_net as package_train_net

    assert (
        train_net.main is package_train_net.main and train_net.Trainer is package_train_net.Trainer
    )


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory):
    """The tiny config (3 classes) trained on trees_train (1 class), evaluated on trees_val."""
    output_dir = tmp_path_factory.mktemp("trees_output")
    run_train_net(
        ["--config-file", str(TINY_CONFIG), *register_args(trees, "trees_train", "trees_val")]
        + ["DATASETS.TRAIN", "('trees_train',)", "DATASETS.TEST", "('trees_val',)"]
        + ["OUTPUT_DIR", str(output_dir), "SOLVER.MAX_ITER", str(MAX_ITER)]
        + ["SOLVER.CHECKPOINT_PERIOD", "1000", "MODEL.SPARSE_RCNN.NUM_STAGES", "2"]
    )
    with open(output_dir / "metrics.json") as f:
        (evaluation,) = [json.loads(line) for line in f if '"bbox/AP"' in line]
    return output_dir, evaluation


def test_training_on_a_registered_coco_json_takes_its_class_count(trained):
    output_dir, evaluation = trained
    saved = make_cfg(output_dir / "config.yaml")
    assert saved.MODEL.SPARSE_RCNN.NUM_CLASSES == 1
    assert saved.DATASETS.TRAIN == ("trees_train",)
    state = torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=True)
    assert state["model"]["head.head_series.0.class_logits.weight"].shape[0] == 1
    # COCOEvaluator at the end of training, on the json's one category (COCO AP of one class
    # has no per-class breakdown).
    assert math.isfinite(evaluation["bbox/AP"]) and 0 <= evaluation["bbox/AP"] <= 100
    assert MetadataCatalog.get("trees_train").thing_classes == ["tree"]


@pytest.fixture
def fresh_process(trees):
    """The trees datasets unregistered, as in a new command's process."""
    for name in trees:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_eval_only_with_register_coco_gives_the_training_evaluation(trained, trees, fresh_process):
    output_dir, evaluation = trained
    # docs/custom_datasets.md's command: the config training wrote, the test set registered.
    eval_results = run_train_net(
        ["--config-file", str(output_dir / "config.yaml"), "--eval-only"]
        + register_args(trees, "trees_val")
        + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
        + ["OUTPUT_DIR", str(output_dir / "eval")]
    )
    assert eval_results["bbox"]["AP"] == pytest.approx(evaluation["bbox/AP"], abs=1e-9)


def demo_run(monkeypatch, argv):
    """Run the demo; return what it drew with: [(threshold, thing_classes, record)] per image."""
    drawn = []
    render = demo.render

    def recording(image, instances, metadata, max_detections, threshold, record):
        drawn.append((threshold, list(metadata.get("thing_classes", [])), record))
        return render(image, instances, metadata, max_detections, threshold, record)

    monkeypatch.setattr(demo, "render", recording)
    demo.main(argv)
    return drawn


def test_demo_with_ground_truth_uses_its_class_names_and_threshold(
    trained, trees, tmp_path, monkeypatch, no_generation, fresh_process
):
    output_dir, _ = trained
    weights = str(output_dir / "model_final.pth")
    # docs/custom_datasets.md's command: the config training wrote, the test set registered.
    drawn = demo_run(
        monkeypatch,
        ["--config-file", str(output_dir / "config.yaml"), *register_args(trees, "trees_val")]
        + ["--dataset", "trees_val", "--output", str(tmp_path / "vis")]
        + ["--opts", "MODEL.WEIGHTS", weights],
    )
    assert len(drawn) == 4 and all(names == ["tree"] for _, names, _ in drawn)
    # The threshold is the F1-optimal one of these images' ground truth.
    cfg = make_cfg(output_dir / "config.yaml", ["MODEL.WEIGHTS", weights])
    predictor = SparseRCNNPredictor(cfg)
    records = DatasetCatalog.get("trees_val")
    found = [predictor(demo.read_image(r["file_name"], "BGR"))["instances"] for r in records]
    assert drawn[0][0] == demo.f1_optimal_threshold(found, records)
    assert [record["file_name"] for _, _, record in drawn] == [r["file_name"] for r in records]


def test_demo_without_ground_truth_uses_the_fixed_threshold_and_the_training_names(
    trained, trees, tmp_path, monkeypatch, no_generation, fresh_process
):
    output_dir, _ = trained
    images = [f"{trees['trees_val'][1]}/00000{i}.png" for i in (1, 2)]
    # The base config (3 classes, the built-in datasets): the class count and names of the
    # registered training set that the options name.
    drawn = demo_run(
        monkeypatch,
        ["--config-file", str(TINY_CONFIG), "--input", *images]
        + register_args(trees, "trees_train")
        + ["--output", str(tmp_path / "vis"), "--opts", "DATASETS.TRAIN", "('trees_train',)"]
        + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
        + ["MODEL.SPARSE_RCNN.NUM_STAGES", "2"],
    )
    assert drawn == [(demo.FALLBACK_THRESHOLD, ["tree"], None)] * 2
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["000001.png", "000002.png"]


def test_demo_of_an_unregistered_dataset_names_register_coco(tmp_path):
    with pytest.raises(DatasetNotRegisteredError) as error:
        demo.main(
            ["--config-file", str(TINY_CONFIG), "--dataset", "trees_nowhere"]
            + ["--output", str(tmp_path)]
        )
    message = str(error.value)
    assert "--register-coco trees_nowhere path/to/trees_nowhere.json path/to/images" in message
    assert len(message) < 400


def test_export_with_register_coco_takes_the_class_count_and_a_sample_image(
    trained, trees, tmp_path, monkeypatch, no_generation
):
    output_dir, _ = trained

    def no_default_image():
        raise AssertionError("the built-in sample image was used")

    monkeypatch.setattr(sparse_export, "default_sample_image", no_default_image)
    path = sparse_export.main(
        ["--config-file", str(TINY_CONFIG), "--output", str(tmp_path)]
        + register_args(trees, "trees_train")
        + ["DATASETS.TRAIN", "('trees_train',)", "MODEL.SPARSE_RCNN.NUM_STAGES", "2"]
        + ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    )
    from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor

    image = demo.read_image(first_image(["trees_train"]), "BGR")
    onnx = ONNXRuntimePredictor(path, num_threads=1)(image)["instances"]
    cfg = make_cfg(
        output_dir / "config.yaml", ["MODEL.WEIGHTS", str(output_dir / "model_final.pth")]
    )
    eager = SparseRCNNPredictor(cfg)(image)["instances"]
    assert len(onnx) == len(eager) > 0 and set(onnx.pred_classes.tolist()) == {0}
    assert torch.allclose(onnx.scores, eager.scores, atol=1e-4)


def test_first_image_reads_the_json(trees):
    register_coco("trees_train", *trees["trees_train"])
    assert first_image(["not_registered", "trees_train"]) == trees["trees_train"][1] + "/000001.png"
    assert first_image([]) is None
