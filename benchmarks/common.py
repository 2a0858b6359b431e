"""Helpers shared by bench_inference.py, bench_train.py and bench_matching.py.

Record style (as bench_pooler.py): one JSON object per measurement, printed and appended to a
``benchmarks/results/*.jsonl`` file, with the exact config, the input sizes, the device, the
thread count, the torch / torchvision / Detectron2 versions, the load average at the time of the
measurement and min / median / max in milliseconds over the repeats after warm-up.
"""

import argparse
import contextlib
import ctypes
import gc
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CONFIG_DIR = REPO_ROOT / "configs"
# The small model of the training-step benchmarks: the quick CPU config (ResNet-18 FPN, 128-d head,
# 50 proposals, 128-px images) with the paper's 6 iterative stages (the config itself trains 3 to
# fit its 10-minute budget); the targets of the benchmark issue refer to this 6-stage model.
SMALL_MODEL_CONFIG = "sparse_rcnn_quick_cpu.yaml"
SMALL_MODEL_OPTS = ["MODEL.SPARSE_RCNN.NUM_STAGES", 6]
sys.path.insert(0, str(REPO_ROOT / "projects"))


# ---------------------------------------------------------------------------------------------
# Environment and records
# ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loadavg() -> List[float]:
    return [round(v, 2) for v in os.getloadavg()]


def environment(threads: int, device: torch.device) -> Dict:
    """Static facts of the run (versions, machine); ``loadavg``/``time`` are added per record."""
    import detectron2
    import torchvision

    env = {
        "device": str(device),
        "threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class Recorder:
    """Prints every record as one JSON line and appends it to ``out_path``.

    Every record gets the load average and ``other_processes_seen``: the other processes seen
    running (sampled every 2 s, count of samples) since the last :meth:`begin` (called before
    every measurement)."""

    def __init__(self, out_path: Path, env: Dict, extra: Optional[Dict] = None):
        self.out_path = Path(out_path)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.extra = extra or {}
        self.monitor = BusyMonitor()

    def begin(self) -> None:
        """Start of a measurement: forget the processes seen so far."""
        self.monitor.begin()

    def emit(self, record: Dict) -> Dict:
        record = {
            **record,
            **self.env,
            **self.extra,
            "loadavg": loadavg(),
            "other_processes_seen": self.monitor.peek(),
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.out_path, "a") as f:
            f.write(line + "\n")
        return record


def common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--quick", action="store_true", help="short version (for make bench)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (per measurement)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (per measurement)")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / default_out), help="JSONL file the records go to"
    )


def stats_ms(values_s: Sequence[float]) -> Dict[str, float]:
    """min / median / max in ms of a list of seconds."""
    values = [v * 1e3 for v in values_s]
    return {
        "min_ms": round(min(values), 3),
        "median_ms": round(statistics.median(values), 3),
        "max_ms": round(max(values), 3),
    }


# ---------------------------------------------------------------------------------------------
# Configs and models
# ---------------------------------------------------------------------------------------------
def make_cfg(config_file: str, opts: Sequence = (), device: torch.device = torch.device("cpu")):
    from detectron2.config import get_cfg

    from sparse_rcnn import add_sparse_rcnn_config

    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / config_file))
    cfg.merge_from_list([str(o) for o in opts])
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = str(device)
    return cfg


def build_model(cfg, seed: int = 0):
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(seed)
    return d2_build_model(cfg)


def config_text(config_file: str, opts: Sequence) -> str:
    """The exact config as a command line would give it: file + overrides."""
    return " ".join([f"configs/{config_file}", "MODEL.WEIGHTS ''"] + [str(o) for o in opts])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_image(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen).float()


def random_instances(height: int, width: int, num_gt: int, num_classes: int, gen: torch.Generator):
    """``num_gt`` GT boxes: sides 2%..30% of the image (more GTs: smaller, a crowded scene)."""
    from detectron2.structures import Boxes, Instances

    # Keep crowded scenes plausible: the side shrinks with sqrt(num_gt).
    max_side = min(0.3, 1.0 / max(num_gt, 1) ** 0.5)
    size = torch.tensor([width, height], dtype=torch.float32)
    wh = (torch.rand(num_gt, 2, generator=gen) * (max_side - 0.02) + 0.02) * size
    xy = torch.rand(num_gt, 2, generator=gen) * (size - wh)
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
    instances.gt_classes = torch.randint(0, num_classes, (num_gt,), generator=gen)
    return instances


def make_batch(
    images: int, height: int, width: int, num_gt: Optional[int], num_classes: int, seed: int = 0
) -> List[Dict]:
    """Detectron2 mapper-style inputs; with ``num_gt`` (training) every image has instances."""
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(images):
        item = {"image": random_image(height, width, gen), "height": height, "width": width}
        if num_gt is not None:
            item["instances"] = random_instances(height, width, num_gt, num_classes, gen)
        batch.append(item)
    return batch


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class PartTimer:
    """Accumulates wall time of named parts (wrapped module forwards or ``with timer(name)``).

    On CUDA every part is bracketed by ``torch.cuda.synchronize`` so that its time is its own.
    Nested parts are subtracted from the enclosing one by the caller (see ``exclusive``).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: Dict[str, float] = defaultdict(float)
        self.enabled = True
        self._wrapped = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[name] += time.perf_counter() - start

    def wrap(self, module: torch.nn.Module, name: str) -> None:
        """Time every call of ``module.forward`` as part ``name`` (an instance attribute)."""
        original = module.forward

        def forward(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)

        module.forward = forward
        self._wrapped.append(module)

    def unwrap_all(self) -> None:
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
        self._wrapped = []

    def reset(self) -> Dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def time_interleaved(
    fns: Dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    device: torch.device,
    memory: Optional[Dict[str, Dict]] = None,
) -> Dict[str, List[float]]:
    """Seconds of every callable, run round robin ``warmup + repeats`` times.

    With a ``memory`` dict, every callable first runs once more, untimed, to record its peak
    memory there (:func:`measure_memory`). That run starts from a trimmed heap (``malloc_trim``),
    so on a CPU it pays page faults that steady-state runs do not: the ``warmup`` runs that follow
    it are what bring the timed runs back to steady state.
    """
    if memory is not None:
        for name, fn in fns.items():
            memory[name] = measure_memory(fn, device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for index in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def max_rss_mb() -> float:
    """Peak RSS of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class RssSampler:
    """Peak resident memory during a block: /proc/self/statm sampled every ``interval`` s by a
    thread (the process-wide ru_maxrss only ever grows, so it cannot give one block's peak).
    Used for a separate untimed run, so the sampling never perturbs the timings."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = current_rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that the RSS before a
    block is the memory actually in use and the block's peak RSS delta is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(fn: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Runs ``fn`` once and returns its peak memory: CPU RSS (peak, and peak minus the RSS before
    the run) and, on CUDA, ``torch.cuda.max_memory_allocated`` during the run."""
    gc.collect()
    release_free_memory()
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with RssSampler() as sampler:
        fn()
        synchronize(device)
    result["peak_rss_mb"] = round(sampler.peak / 2**20, 1)
    result["peak_rss_delta_mb"] = round((sampler.peak - sampler.start) / 2**20, 1)
    result["max_rss_mb_process"] = max_rss_mb()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result["cuda_max_allocated_mb"] = round(peak / 2**20, 1)
        result["cuda_max_allocated_delta_mb"] = round((peak - base) / 2**20, 1)
    return result


def busy_python_processes() -> List[str]:
    """Other python processes running (state R) now, to flag measurements on a busy machine."""
    return [cmd for cmd in running_processes() if "python" in cmd]


def running_processes() -> List[str]:
    """Command lines of the other processes in state R (running or runnable) now."""
    me = os.getpid()
    busy = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "R":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if cmd:  # kernel threads have no command line
            busy.append(cmd[:120])
    return busy


class BusyMonitor:
    """Samples the other running processes every ``interval`` s in a daemon thread; ``peek()``
    returns the distinct ones seen (with their sample counts) since ``begin()``. Records carry them
    as ``other_processes_seen`` so that measurements taken on a busy machine can be re-run."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.seen: Dict[str, int] = {}
        self.lock = threading.Lock()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()

    def _run(self):
        while True:
            busy = running_processes()
            with self.lock:
                for cmd in busy:
                    self.seen[cmd] = self.seen.get(cmd, 0) + 1
            time.sleep(self.interval)

    def begin(self) -> None:
        """Forget what was seen so far (call before a measurement)."""
        with self.lock:
            self.seen = {}

    def peek(self) -> Dict[str, int]:
        with self.lock:
            return dict(self.seen)


def warn_if_busy() -> None:
    """Warns on stderr when other processes are running (the load average alone also counts this
    process's own recent work)."""
    busy = running_processes()
    if busy:
        print(
            f"# warning: other processes running (load average {os.getloadavg()[0]:.2f}): {busy}; "
            "timings may be inflated",
            file=sys.stderr,
            flush=True,
        )
