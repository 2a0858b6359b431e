"""What the benchmark scripts share: arguments, models and inputs, timing, memory and records.

Timing is ``torch.utils.benchmark.Timer.blocked_autorange`` (its block-size estimate is the
warm-up run; it sets the thread count and synchronises CUDA); memory and the other processes on
the machine come from ``psutil``; the environment from Detectron2's ``collect_env_info``. Every
measurement prints one JSON record and appends it to a ``benchmarks/results/*.jsonl`` file, with
the exact config, input sizes, device, threads, versions, min / median / max / IQR in ms, the load
average and the CPU the other processes used during the measurement.
"""

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil
import torch
from torch.utils.benchmark import Measurement, Timer

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# The small model of the training-step benchmarks and their targets: the quick CPU config (R-18 FPN,
# 128-d head, 50 proposals, 128-px images) with the paper's 6 stages (the config trains 3).
SMALL_MODEL_CONFIG = "sparse_rcnn_quick_cpu.yaml"
SMALL_MODEL_OPTS = ["MODEL.SPARSE_RCNN.NUM_STAGES", 6]


def parse_args(parser: argparse.ArgumentParser, default_out: str, min_run_time: float):
    """Adds the shared options, parses, sets the threads; returns ``(args, device, recorder)``.

    ``--min-run-time`` is the seconds ``blocked_autorange`` spends on each measured callable
    (at least one run after the warm-up); ``--quick`` divides it by 4.
    """
    parser.add_argument("--quick", action="store_true", help="short version (for make bench)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--min-run-time", type=float, default=min_run_time, help="s per callable")
    parser.add_argument("--out", default=str(RESULTS_DIR / default_out), help="JSONL output")
    args = parser.parse_args()
    if args.quick:
        args.min_run_time /= 4
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    return args, device, Recorder(args.out, device, args.threads, {"quick": args.quick})


class Recorder:
    """Prints every record as one JSON line and appends it to ``out_path``; the first record of a
    run is Detectron2's ``collect_env_info()``. :meth:`begin` starts a measurement: the records
    emitted after it carry the machine's CPU use and the other processes that used more than 5%
    of a core since then (``psutil``)."""

    def __init__(self, out_path, device: torch.device, threads: int, extra: Dict):
        from detectron2 import __version__ as d2_version
        from detectron2.utils.collect_env import collect_env_info

        self.out_path = Path(out_path)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = dict(device=str(device), threads=threads, torch=torch.__version__, **extra)
        self.env.update(detectron2=d2_version, cpu=cpu_model(), cpu_count=psutil.cpu_count())
        if device.type == "cuda":
            self.env["gpu"] = torch.cuda.get_device_name(device)
        self.begin()
        self.emit("environment", collect_env_info=collect_env_info())

    def begin(self) -> None:
        self.load = None
        psutil.cpu_percent()
        self.others = {p.pid: p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()}
        for p in self.others.values():
            with contextlib.suppress(psutil.Error):
                p.cpu_percent()

    def _other_processes(self) -> Dict[str, float]:
        busy = {}
        for p in self.others.values():
            with contextlib.suppress(psutil.Error):
                percent = p.cpu_percent()
                if percent > 5:
                    busy[" ".join(p.info["cmdline"] or [])[:120] or p.name()] = percent
        return busy

    def emit(self, benchmark: str, **fields) -> Dict:
        if self.load is None:  # the first record of a measurement: CPU use since begin()
            self.load = {
                "machine_cpu_percent": psutil.cpu_percent(),
                "other_processes_cpu_percent": self._other_processes(),
            }
        record = {
            "benchmark": benchmark,
            **fields,
            **self.env,
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        }
        record.update(self.load, time=datetime.datetime.now().isoformat(timespec="seconds"))
        line = json.dumps(record)
        print(line if benchmark != "environment" else line[:200] + " ...", flush=True)
        with open(self.out_path, "a") as f:
            f.write(line + "\n")
        return record


def cpu_model() -> str:
    """The CPU's model name, family and model (``/proc/cpuinfo``; ``platform.processor()``
    elsewhere): ratios between runtimes depend on the CPU."""
    import platform

    info = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for key, _, value in (line.partition(":") for line in f):
            info.setdefault(key.strip(), value.strip())
    if "model name" in info:
        return f"{info['model name']} (family {info.get('cpu family')}, model {info.get('model')})"
    return platform.processor() or "unknown"


def make_cfg(config_file: str, opts: Sequence = (), device: torch.device = torch.device("cpu")):
    from sparse_rcnn.config import get_sparse_rcnn_cfg

    extra = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)]
    return get_sparse_rcnn_cfg(REPO_ROOT / "configs" / config_file, [*map(str, opts), *extra])


def build_model(cfg, seed: int = 0):
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(seed)
    return d2_build_model(cfg)


def scale_box_deltas(model, factor: float):
    """Scale every head stage's box-delta layer by ``factor`` (in place; returns ``model``): a
    random model's boxes then stay on the image as a trained model's do (tests/test_export.py
    says why the export comparisons need it)."""
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.mul_(factor)
            stage.bboxes_delta.bias.mul_(factor)
    return model


def config_text(config_file: str, opts: Sequence = ()) -> str:
    """The exact config as a command line would give it: file + overrides."""
    return " ".join([f"configs/{config_file}", "MODEL.WEIGHTS ''"] + [str(o) for o in opts])


def random_instances(height: int, width: int, num_gt: int, num_classes: int, gen: torch.Generator):
    """``num_gt`` GT boxes: sides 2%..30% of the image (more GTs: smaller, a crowded scene)."""
    from detectron2.structures import Boxes, Instances

    max_side = min(0.3, 1.0 / max(num_gt, 1) ** 0.5)
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = (torch.rand(num_gt, 2, generator=gen) * (max_side - 0.02) + 0.02) * size
    xy = torch.rand(num_gt, 2, generator=gen) * (size - wh)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
    instances.gt_classes = torch.randint(0, num_classes, (num_gt,), generator=gen)
    return instances


def make_batch(images, height, width, num_gt: Optional[int], num_classes, seed=0) -> List[Dict]:
    """Detectron2 mapper-style inputs; with ``num_gt`` (training) every image has instances."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
        item = {"image": image.float(), "height": height, "width": width}
        if num_gt is not None:
            item["instances"] = random_instances(height, width, num_gt, num_classes, gen)
        batch.append(item)
    return batch


def measure(fns: Dict[str, Callable[[], None]], args, device, memory: bool = True):
    """``{name: (Measurement, memory dict)}``: every callable first runs once for its peak memory
    (:func:`peak_memory`, from a trimmed heap, so it pays page faults), then
    ``Timer.blocked_autorange(min_run_time=args.min_run_time)``, whose first run warms up."""
    out = {}
    for name, fn in fns.items():
        mem = peak_memory(fn, device) if memory else {}
        timer = Timer("fn()", globals={"fn": fn}, num_threads=args.threads, description=name)
        out[name] = (timer.blocked_autorange(min_run_time=args.min_run_time), mem)
    return out


def timed_runs(m: Measurement) -> int:
    return len(m.raw_times) * m.number_per_run


def stats_ms(m: Measurement) -> Dict[str, float]:
    return times_stats_ms(m.times, runs=timed_runs(m))


def times_stats_ms(times: Sequence[float], runs: Optional[int] = None) -> Dict[str, float]:
    """Runs, min, median, max and interquartile range (ms) of run times in seconds, with the
    quantiles of ``torch.utils.benchmark.Measurement`` (``runs``: default ``len(times)``)."""
    ms = torch.tensor([t * 1e3 for t in times], dtype=torch.float64)
    q25, median, q75 = (float(ms.quantile(q)) for q in (0.25, 0.5, 0.75))
    out = dict(min_ms=float(ms.min()), median_ms=median, max_ms=float(ms.max()), iqr_ms=q75 - q25)
    return {
        "runs": len(times) if runs is None else runs,
        **{k: round(v, 3) for k, v in out.items()},
    }


class PartTimer:
    """Wall time of named parts (wrapped module forwards or ``with timer(name)``), bracketed by
    ``torch.cuda.synchronize`` on a GPU; :meth:`take` returns each part's total and restarts."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - start

    def wrap(self, module: torch.nn.Module, name: str) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)

        module.forward = forward

    def take(self) -> Dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def part_medians_ms(parts: List[Dict[str, float]], m: Measurement) -> Dict[str, float]:
    """Median of every part over the runs ``m`` timed (the last ones of ``parts``), in ms."""
    parts = parts[-timed_runs(m) :]
    return {k: round(statistics.median(p.get(k, 0.0) for p in parts) * 1e3, 3) for k in parts[0]}


def peak_memory(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """One run of ``fn``: peak RSS (psutil, sampled every 2 ms by a thread) and its rise over the
    RSS before the run (glibc's free heap returned first); on CUDA ``max_memory_allocated``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    process, done = psutil.Process(), threading.Event()
    start = peak = process.memory_info().rss

    def sample():
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done.set()
    thread.join()
    peak = max(peak, process.memory_info().rss)
    result = {
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_delta_mb": round((peak - start) / 2**20, 1),
    }
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result
