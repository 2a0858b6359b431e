"""Two CPU processes (gloo, through Detectron2's ``launch``) train like one process on all images.

DDP averages gradients over processes and the criterion averages the GT count over processes, so
two processes that each see half of a batch must produce the same gradients, hence the same
updated weights, as one process that sees the whole batch; the one-process loss is the mean of the
two processes' losses.

The model runs in float64: the tiny model's random weights amplify float32 rounding (which
depends on the batch size and thread count) into different Hungarian matches, which would hide
what this test checks behind noise.
"""

import copy

import pytest
import torch
from conftest import build_tiny_model, make_cfg
from detectron2.engine import defaults, launch
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from sparse_rcnn.engine import enable_cpu_distributed_training
from sparse_rcnn.solver import build_optimizer

NUM_ITERS = 3
BASE_LR = 1e-4


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


def train(model, batches):
    """NUM_ITERS steps of the trainer's optimizer; returns per-step total losses and the weights."""
    cfg = make_cfg(opts=["SOLVER.BASE_LR", BASE_LR])
    model = model.double()
    optimizer = build_optimizer(cfg, model)
    model = defaults.create_ddp_model(model, broadcast_buffers=False)
    model.train()
    losses = []
    for _ in range(NUM_ITERS):
        loss_dict = model(copy.deepcopy(batches))
        total = sum(loss_dict.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    state = {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}
    return losses, state


def _worker(result_path):
    enable_cpu_distributed_training()
    torch.set_num_threads(1)
    rank = comm.get_rank()
    batch = make_batch()[2 * rank : 2 * rank + 2]
    losses, state = train(build_tiny_model(seed=0), batch)
    torch.save({"losses": losses, "state": state}, f"{result_path}.{rank}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("ddp") / "result")
    launch(_worker, 2, dist_url="auto", args=(path,))
    two = [torch.load(f"{path}.{rank}") for rank in range(2)]
    one_losses, one_state = train(build_tiny_model(seed=0), make_batch())
    initial = build_tiny_model(seed=0).state_dict()
    moved = max((one_state[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > BASE_LR / 2, "training did not change the weights"
    return two, one_losses, one_state


def test_two_gloo_processes_match_one_process_losses(results):
    two, one_losses, _ = results
    for step in range(NUM_ITERS):
        mean_of_ranks = (two[0]["losses"][step] + two[1]["losses"][step]) / 2
        # The criterion computes in float32 (for AMP safety), so the losses agree to float32.
        assert mean_of_ranks == pytest.approx(one_losses[step], rel=1e-6)


def test_two_gloo_processes_match_one_process_weights(results):
    two, _, one_state = results
    for rank in range(2):
        for name, value in one_state.items():
            other = two[rank]["state"][name]
            # Adam can turn rounding noise on zero gradients (attention key biases) into steps of
            # up to +-lr per step; all else agrees to float64 rounding (measured: 7e-12).
            assert (other - value).abs().max() <= NUM_ITERS * BASE_LR + 1e-6, name
    trained = [k for k in one_state if "head" in k or "proposal" in k]
    diffs = torch.cat([(two[0]["state"][k] - one_state[k]).flatten().abs() for k in trained])
    assert (diffs <= 1e-9).float().mean() >= 0.99
