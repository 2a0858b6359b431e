"""The evaluator of a dataset (COCO box AP, or CrowdHuman's metrics) and per-stage evaluation:
the AP of every iterative stage in one pass (Dynamic Sparse R-CNN, figure 6), with
``MODEL.SPARSE_RCNN.EVAL_PER_STAGE: True`` (yaml) or ``model.output_all_stages=True``
(LazyConfig) so the model returns "stage_instances". One factory for both config systems:
:func:`build_sparse_rcnn_evaluator` is ``@configurable``."""

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Union

from detectron2.config import configurable
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

from . import dataset_checks
from .builtin_datasets import prepare_builtin_dataset
from .crowdhuman_evaluation import CrowdHumanEvaluator, is_crowdhuman_dataset


class PerStageEvaluator(DatasetEvaluator):
    """Feeds stage t's detections to its own evaluator; reports ``bbox_stage{t}`` per stage.

    The final detections ("instances") still go to the main evaluator, whose results are
    returned unchanged next to the per-stage ones.
    """

    def __init__(
        self,
        main_evaluator: DatasetEvaluator,
        make_stage_evaluator: Callable[[str], DatasetEvaluator],
        num_stages: int,
        output_folder: str,
    ):
        """
        Args:
            main_evaluator: evaluates the model's final "instances".
            make_stage_evaluator: output folder -> a fresh evaluator for one stage.
            num_stages: T.
            output_folder: stage t writes into ``{output_folder}/stage{t}``.
        """
        self.main_evaluator = main_evaluator
        self.stage_evaluators = [
            make_stage_evaluator(output_folder and os.path.join(output_folder, f"stage{t + 1}"))
            for t in range(num_stages)
        ]

    def reset(self):
        self.main_evaluator.reset()
        for evaluator in self.stage_evaluators:
            evaluator.reset()

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        self.main_evaluator.process(inputs, outputs)
        for t, evaluator in enumerate(self.stage_evaluators):
            missing = [o for o in outputs if "stage_instances" not in o]
            if missing:
                raise KeyError(
                    "PerStageEvaluator needs 'stage_instances' in the model outputs: set "
                    "MODEL.SPARSE_RCNN.EVAL_PER_STAGE True (yaml) or model.output_all_stages=True "
                    "(LazyConfig)"
                )
            evaluator.process(inputs, [{"instances": o["stage_instances"][t]} for o in outputs])

    def evaluate(self):
        results = OrderedDict(self.main_evaluator.evaluate() or {})
        for t, evaluator in enumerate(self.stage_evaluators):
            for task, metrics in (evaluator.evaluate() or {}).items():
                results[f"{task}_stage{t + 1}"] = metrics
        return results


def _evaluator_from_config(cfg, dataset_name: str, output_folder: Optional[str] = None) -> Dict:
    return {
        "dataset_name": dataset_name,
        "output_dir": output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name),
        "per_stage": cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE,
        "num_stages": cfg.MODEL.SPARSE_RCNN.NUM_STAGES,
        "tasks": ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
    }


@configurable(from_config=_evaluator_from_config)
def build_sparse_rcnn_evaluator(
    dataset_name: Union[str, Sequence[str]],
    *,
    output_dir: Optional[str] = None,
    per_stage: bool = False,
    num_stages: int = 6,
    tasks: Sequence[str] = ("bbox",),
) -> DatasetEvaluator:
    """COCOEvaluator (box AP) on ``dataset_name``; generates a built-in dataset first if needed.

    Datasets whose metadata has ``evaluator_type == "crowdhuman"`` (``crowdhuman_train``/``_val``)
    get :class:`CrowdHumanEvaluator` (AP, mMR, Recall of the official protocol) instead of COCO
    AP (per stage too: ``crowdhuman_stage{t}``).

    A yaml config calls it as ``build_sparse_rcnn_evaluator(cfg, dataset_name, output_folder)``
    (``output_folder`` default ``{OUTPUT_DIR}/inference/{dataset_name}``; ``per_stage`` from
    ``MODEL.SPARSE_RCNN.EVAL_PER_STAGE``), a LazyConfig names it in ``dataloader.evaluator``
    (``configs/common/data/coco.py``; ``per_stage`` is ``model.output_all_stages``).

    Args:
        dataset_name: a registered dataset (or a list of one).
        output_dir: where the evaluator writes its results (stage t: ``{output_dir}/stage{t}``).
        per_stage: evaluate every stage too (``bbox_stage{t}``); the model must return
            "stage_instances".
        num_stages: T, the model's number of stages.
        tasks: COCOEvaluator's tasks: ("bbox",), or ("bbox", "segm") for a model with masks
            (``MODEL.MASK_ON``, QueryInst).
    """
    names = dataset_checks.dataset_names(dataset_name)
    if len(names) != 1:
        raise ValueError(
            f"build_sparse_rcnn_evaluator evaluates one dataset, got {names}: evaluate each "
            "dataset on its own (one test loader and evaluator per dataset)."
        )
    dataset_name = names[0]
    prepare_builtin_dataset(dataset_name)

    def make_evaluator(folder):
        if is_crowdhuman_dataset(dataset_name):
            return CrowdHumanEvaluator(dataset_name, output_dir=folder)
        return COCOEvaluator(dataset_name, tasks=tuple(tasks), output_dir=folder)

    evaluator = make_evaluator(output_dir)
    if per_stage:
        evaluator = PerStageEvaluator(evaluator, make_evaluator, num_stages, output_dir)
    return evaluator
