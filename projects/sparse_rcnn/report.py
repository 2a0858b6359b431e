"""Print the COCO box AP of a finished training run from its ``metrics.json``.

python -m sparse_rcnn.report output/quick_cpu
"""

import json
import os
import sys

from tabulate import tabulate


def last_evaluation(output_dir: str) -> dict:
    """The last evaluation logged to ``{output_dir}/metrics.json`` (keys ``bbox/AP``, ...)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    evaluations = [r for r in records if "bbox/AP" in r]
    if not evaluations:
        raise SystemExit(f"No COCO evaluation in {output_dir}/metrics.json")
    return evaluations[-1]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    output_dir = argv[0] if argv else "output/quick_cpu"
    record = last_evaluation(output_dir)
    metrics = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    per_class = sorted(k[len("bbox/AP-") :] for k in record if k.startswith("bbox/AP-"))
    headers = metrics + [f"AP-{c}" for c in per_class]
    values = [record.get(f"bbox/{m}", float("nan")) for m in headers]
    print(f"COCO box AP of {output_dir} after iteration {record['iteration']}:")
    print(tabulate([values], headers=headers, tablefmt="pipe", floatfmt=".1f"))
    vis = os.path.join(output_dir, "vis")
    if os.path.isdir(vis):
        print(f"Predictions drawn on validation images: {vis}/")


if __name__ == "__main__":
    main()
