"""The evaluator of a dataset (COCO box AP, or CrowdHuman's metrics) and per-stage evaluation:
the AP of every iterative stage in one pass (Dynamic Sparse R-CNN, figure 6), with
``MODEL.SPARSE_RCNN.EVAL_PER_STAGE: True`` so the model returns "stage_instances"."""

import os
from collections import OrderedDict
from typing import Callable, Dict, List

from detectron2.evaluation import COCOEvaluator, DatasetEvaluator

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
            make_stage_evaluator(os.path.join(output_folder, f"stage{t + 1}"))
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
                    "MODEL.SPARSE_RCNN.EVAL_PER_STAGE True"
                )
            evaluator.process(inputs, [{"instances": o["stage_instances"][t]} for o in outputs])

    def evaluate(self):
        results = OrderedDict(self.main_evaluator.evaluate() or {})
        for t, evaluator in enumerate(self.stage_evaluators):
            for task, metrics in (evaluator.evaluate() or {}).items():
                results[f"{task}_stage{t + 1}"] = metrics
        return results


def build_sparse_rcnn_evaluator(cfg, dataset_name: str, output_folder=None):
    """COCOEvaluator (box AP) on ``dataset_name``; generates a built-in dataset first if needed.

    With ``MODEL.SPARSE_RCNN.EVAL_PER_STAGE`` every stage is evaluated too (``bbox_stage{t}``).

    Datasets whose metadata has ``evaluator_type == "crowdhuman"`` (``crowdhuman_train``/``_val``)
    get :class:`CrowdHumanEvaluator` (AP, mMR, Recall of the official protocol) instead of COCO
    AP (per stage too: ``crowdhuman_stage{t}``).
    """
    prepare_builtin_dataset(dataset_name)
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)

    def make_evaluator(folder):
        if is_crowdhuman_dataset(dataset_name):
            return CrowdHumanEvaluator(dataset_name, output_dir=folder)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=folder)

    evaluator = make_evaluator(output_folder)
    if cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE:
        num_stages = cfg.MODEL.SPARSE_RCNN.NUM_STAGES
        evaluator = PerStageEvaluator(evaluator, make_evaluator, num_stages, output_folder)
    return evaluator
