"""Report a finished training run: its COCO box AP and where its pictures are.

    python -m sparse_rcnn.report output/demo_cpu

Reads ``{output_dir}/metrics.json``, prints the last evaluation's AP table (and the AP of every
stage, if the run evaluated with ``MODEL.SPARSE_RCNN.EVAL_PER_STAGE``), draws the training curves
(``training_curves.png``) and the AP per stage (``ap_per_stage.png``) into the output directory, and
prints their paths and that of the drawn detections (``vis/``, written by the demo).
"""

import os
import sys

from tabulate import tabulate

from .visualization import plot_ap_per_stage, plot_training_curves, read_metrics, stage_ap


def last_evaluation(records) -> dict:
    """The last evaluation among metrics.json records (keys ``bbox/AP``, ...)."""
    evaluations = [r for r in records if "bbox/AP" in r]
    if not evaluations:
        raise SystemExit(
            "No COCO evaluation in metrics.json (was TEST.EVAL_PERIOD or the final "
            "evaluation skipped?)"
        )
    return evaluations[-1]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    output_dir = argv[0] if argv else "output/demo_cpu"
    records = read_metrics(output_dir)
    record = last_evaluation(records)
    metrics = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    per_class = sorted(k[len("bbox/AP-") :] for k in record if k.startswith("bbox/AP-"))
    headers = metrics + [f"AP-{c}" for c in per_class]
    values = [record.get(f"bbox/{m}", float("nan")) for m in headers]
    print(f"COCO box AP of {output_dir} after iteration {record['iteration']}:")
    print(tabulate([values], headers=headers, tablefmt="pipe", floatfmt=".1f"))
    per_stage = stage_ap(record)
    if per_stage:
        print("AP per stage: " + ", ".join(f"stage {t} {ap:.1f}" for t, ap in per_stage.items()))
        path = plot_ap_per_stage(record, os.path.join(output_dir, "ap_per_stage.png"))
        print(f"AP per stage drawn: {path}")
    path = plot_training_curves(records, os.path.join(output_dir, "training_curves.png"))
    print(f"Training curves drawn: {path}")
    vis = os.path.join(output_dir, "vis")
    if os.path.isdir(vis):
        print(f"Predictions beside the ground truth, drawn on validation images: {vis}/")


if __name__ == "__main__":
    main()
