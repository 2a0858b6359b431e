#!/usr/bin/env bash
# `make bench`: the quick (--quick) CPU version of every benchmark, a few minutes in total on 2
# cores. Records go to $BENCH_OUT/*.jsonl (default output/bench, ignored by git) so that quick runs
# never mix with the full results kept in benchmarks/results/.
#
# Usage: benchmarks/run_all.sh [PYTHON]   (default: .venv/bin/python, else python3)
#        BENCH_OUT=dir BENCH_THREADS=n BENCH_DEVICE=cpu|cuda|auto benchmarks/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${BENCH_OUT:-output/bench}"
THREADS="${BENCH_THREADS:-2}"
DEVICE="${BENCH_DEVICE:-cpu}"
mkdir -p "$OUT"
echo "# make bench: quick benchmarks, $THREADS threads, device $DEVICE, records in $OUT/" >&2
echo "# load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)" >&2

run() {
    local name="$1"; shift
    echo "# --- $name" >&2
    local start=$SECONDS
    "$PY" "$@"
    echo "# --- $name: $((SECONDS - start)) s" >&2
}

run pooler    benchmarks/bench_pooler.py --quick --threads "$THREADS" --out "$OUT/pooler.jsonl"
run inference benchmarks/bench_inference.py --quick --threads "$THREADS" --device "$DEVICE" \
    --out "$OUT/inference.jsonl"
run train     benchmarks/bench_train.py --quick --threads "$THREADS" --device "$DEVICE" \
    --out "$OUT/train.jsonl"
run matching  benchmarks/bench_matching.py --quick --threads "$THREADS" --device "$DEVICE" \
    --out "$OUT/matching.jsonl"
run export    benchmarks/bench_export.py --quick --threads "$THREADS" --device cpu \
    --out "$OUT/export.jsonl"

# Summary of the targets measured by this run (the last record of each).
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
last = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    for record in map(json.loads, path.read_text().splitlines()):
        if "target_pass" in record:
            last[record["target"], record.get("matcher")] = record
for (target, matcher), record in last.items():
    status = "PASS" if record["target_pass"] else "FAIL"
    value = {k: record[k] for k in ("model_over_backbone", "speedup_median", "match_loss_share",
             "ratio_median", "speedup_onnxruntime_vs_eager") if k in record}
    print(f"#   {status} {target}{f' [{matcher}]' if matcher else ''}: {value}", file=sys.stderr)
PYEOF
