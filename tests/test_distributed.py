"""Two CPU processes (gloo, through Detectron2's ``launch``) train like one process on all images.

DDP averages gradients over processes and the criterion averages the GT count over processes, so
two processes that each see half of a batch must produce the same gradients, hence the same
updated weights, as one process that sees the whole batch; the one-process loss is the mean of the
two processes' losses. The same holds with Dynamic Sparse R-CNN's OTA matcher and the
"num_positives" normaliser, whose per-stage positive counts are all-reduced: both processes must
make the same all-reduces in the same order, and their results must be the one-process counts
divided by the number of processes.

The model runs in float64: the tiny model's random weights amplify float32 rounding (which
depends on the batch size and thread count) into different Hungarian matches, which would hide
what this test checks behind noise.
"""

import copy
import os

import pytest
import torch
from detectron2.engine import defaults, launch
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from conftest import build_tiny_model, make_cfg
from sparse_rcnn.criterion import SetCriterion
from sparse_rcnn.distributed import (
    apply_cpu_threads,
    available_cpus,
    cpu_threads_per_process,
    enable_cpu_distributed_training,
)
from sparse_rcnn.solver import build_optimizer

NUM_ITERS = 3
BASE_LR = 1e-4
# Dynamic Sparse R-CNN's label assignment with its per-stage normaliser. A fixed k of 3 with unit
# increasing gives k* = 1, 1, 1, 2, 2, 3 at stages 1-6 (the dynamic k of a random model is 1
# everywhere, where the positive count would equal the GT count and test nothing more).
# A sharp transport plan (eps 0.01 instead of OTA's 0.1, enough iterations to converge). With eps
# 0.1 the two runs' losses parted after the first step (by a relative 1.3e-4): the step-1 matches
# are identical, but a random model's plan is diffuse, and near ties between suppliers under OTA's
# row-rescaled reading turn the rounding differences of the gradient all-reduce into other matches.
OTA_OPTS = [
    "MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher",
    "MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives",
    "MODEL.SPARSE_RCNN.OTA.FIXED_K", 3,
    "MODEL.SPARSE_RCNN.OTA.SINKHORN_EPS", 0.01,
    "MODEL.SPARSE_RCNN.OTA.SINKHORN_ITERS", 300,
]  # fmt: skip
VARIANTS = {"hungarian": [], "ota": OTA_OPTS}


def make_batch():
    """Four 96x128 images with 1-4 boxes each (one image without objects)."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for i, num_boxes in enumerate([2, 0, 4, 1]):
        image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=generator)
        xy = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([80.0, 60.0])
        wh = torch.rand(num_boxes, 2, generator=generator) * 40 + 8
        instances = Instances((96, 128))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 3, (num_boxes,), generator=generator)
        batch.append({"image": image, "instances": instances, "height": 96, "width": 128})
    return batch


class RecordedCounts:
    """Records every ``SetCriterion.average_over_processes`` call: (count given, result)."""

    def __init__(self):
        self.calls = []
        self.original = SetCriterion.average_over_processes

    def __enter__(self):
        original = self.original

        def recorded(count, device):
            result = original(count, device)
            self.calls.append((float(count), result))
            return result

        SetCriterion.average_over_processes = staticmethod(recorded)
        return self

    def __exit__(self, *exc):
        SetCriterion.average_over_processes = staticmethod(self.original)


def train(model, batches, opts=()):
    """NUM_ITERS steps of the trainer's optimizer; returns per-step total losses, the weights
    and the loss normaliser calls."""
    cfg = make_cfg(opts=["SOLVER.BASE_LR", BASE_LR, *opts])
    model = model.double()
    optimizer = build_optimizer(cfg, model)
    model = defaults.create_ddp_model(model, broadcast_buffers=False)
    model.train()
    losses = []
    with RecordedCounts() as counts:
        for _ in range(NUM_ITERS):
            loss_dict = model(copy.deepcopy(batches))
            total = sum(loss_dict.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(total.item())
    state = {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}
    return {"losses": losses, "state": state, "counts": counts.calls}


def _worker(result_path):
    enable_cpu_distributed_training()
    threads = apply_cpu_threads()  # what train_net.main does in every process
    result = {"threads": threads, "num_threads": torch.get_num_threads()}
    torch.set_num_threads(1)
    rank = comm.get_rank()
    batch = make_batch()[2 * rank : 2 * rank + 2]
    for name, opts in VARIANTS.items():
        result[name] = train(build_tiny_model(opts, seed=0), batch, opts)
    torch.save(result, f"{result_path}.{rank}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("ddp") / "result")
    user_threads = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        share = cpu_threads_per_process(2)  # what train_net.py does before launch
        launch(_worker, 2, dist_url="auto", args=(path,))
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if user_threads is not None:
            os.environ["OMP_NUM_THREADS"] = user_threads
    two = [torch.load(f"{path}.{rank}") for rank in range(2)]
    one = {
        name: train(build_tiny_model(opts, seed=0), make_batch(), opts)
        for name, opts in VARIANTS.items()
    }
    initial = build_tiny_model(seed=0).state_dict()
    for name in VARIANTS:
        moved = max((one[name]["state"][k] - initial[k]).abs().max().item() for k in initial)
        assert moved > BASE_LR / 2, "training did not change the weights"
    return two, one, share


def test_two_processes_split_the_cores(results):
    two, _, share = results
    assert share == max(1, available_cpus() // 2)
    for rank in range(2):
        assert two[rank]["threads"] == share and two[rank]["num_threads"] == share


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_gloo_processes_match_one_process_losses(results, variant):
    two, one, _ = results
    for step in range(NUM_ITERS):
        mean_of_ranks = (two[0][variant]["losses"][step] + two[1][variant]["losses"][step]) / 2
        # The criterion computes in float32 (for AMP safety), so the losses agree to float32.
        assert mean_of_ranks == pytest.approx(one[variant]["losses"][step], rel=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_normalisers_are_all_reduced_in_step(results, variant):
    two, one, _ = results
    calls = [two[rank][variant]["counts"] for rank in range(2)]
    reference = one[variant]["counts"]
    # num_gt: one all-reduce per step; num_positives: one more per stage (6 stages).
    per_step = 1 + (6 if variant == "ota" else 0)
    assert len(calls[0]) == len(calls[1]) == len(reference) == NUM_ITERS * per_step
    for (count0, result0), (count1, result1), (count, result) in zip(*calls, reference):
        # Both processes got the same result: the mean of their counts (clamped to >= 1) ...
        assert result0 == result1 == max(1.0, (count0 + count1) / 2)
        # ... whose sum is the one-process count (same images, same matching).
        assert count0 + count1 == count and result == max(1.0, count)
    if variant == "ota":
        # Per step: the GT count (7), then the positives of stages 1-6. With k* = 1, 1, 1, 2, 2, 3
        # GT units per stage, the later stages have more positives than GT boxes, so the
        # normaliser really is the positive count here (the exact count depends on the matching).
        counts = [c for c, _ in reference[:per_step]]
        assert counts[0] == 7 and max(counts[1:]) > 7


# Parameters whose gradient is zero in exact arithmetic: softmax attention is invariant to the key
# bias (it adds the same q.b_k to every logit of a query), so the key part of every stage's
# ``self_attn.in_proj_bias`` (elements d ... 2d-1) gets only rounding noise as a gradient, which Adam
# turns into steps of up to +-lr per iteration in either direction, differently in one and two
# processes. Every other value must agree to float64 rounding.
def exempt(name, value, hidden_dim=32):
    mask = torch.zeros_like(value, dtype=torch.bool)
    if name.endswith("self_attn.in_proj_bias"):
        mask[hidden_dim : 2 * hidden_dim] = True
    return mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_gloo_processes_match_one_process_weights(results, variant):
    two, one, _ = results
    one_state = one[variant]["state"]
    initial = build_tiny_model(seed=0).state_dict()
    for rank in range(2):
        for name, value in one_state.items():
            diff = (two[rank][variant]["state"][name] - value).abs()
            mask = exempt(name, value)
            if (~mask).any():
                assert diff[~mask].max().item() <= 1e-9, name
            # The exempt values move by at most one Adam step (lr) per iteration.
            if mask.any():
                assert diff[mask].max().item() <= 2 * NUM_ITERS * BASE_LR, name
    # Every trained parameter moved: the tight comparison above compares real updates.
    trainable = [n for n, p in build_tiny_model(seed=0).named_parameters() if p.requires_grad]
    assert len(trainable) > 100
    for name in trainable:
        assert not torch.equal(one_state[name], initial[name].to(one_state[name].dtype)), name
