"""Initial proposal boxes (paper table 6 variants) and LearnableProposals."""

import itertools

import pytest
import torch

from sparse_rcnn.proposals import LearnableProposals, initial_proposal_boxes


def to_xyxy(cxcywh):
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def test_image_init():
    boxes = initial_proposal_boxes(7, "image")
    assert boxes.shape == (7, 4)
    assert torch.equal(boxes, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 7))
    assert torch.equal(to_xyxy(boxes), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 7))


def test_center_init():
    boxes = initial_proposal_boxes(5, "center")
    torch.testing.assert_close(boxes, torch.tensor([[0.5, 0.5, 0.1, 0.1]] * 5))


@pytest.mark.parametrize("n,rows,cols", [(100, 10, 10), (20, 4, 5)])
def test_grid_tiles_unit_square(n, rows, cols):
    boxes = initial_proposal_boxes(n, "grid")
    assert boxes.shape == (n, 4)
    xyxy = to_xyxy(boxes.double())
    eps = 1e-6
    assert (xyxy >= -eps).all() and (xyxy <= 1 + eps).all()
    # Every cell has the size of a rows x cols grid cell.
    torch.testing.assert_close(boxes[:, 2], torch.full((n,), 1 / cols))
    torch.testing.assert_close(boxes[:, 3], torch.full((n,), 1 / rows))
    # Total area 1 and no two cells overlap: the cells tile the square.
    areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    assert float(areas.sum()) == pytest.approx(1.0, abs=1e-6)
    for i, j in itertools.combinations(range(n), 2):
        iw = min(xyxy[i, 2], xyxy[j, 2]) - max(xyxy[i, 0], xyxy[j, 0])
        ih = min(xyxy[i, 3], xyxy[j, 3]) - max(xyxy[i, 1], xyxy[j, 1])
        # float32 cell edges: allow 1e-6 of slack on each side
        assert float(iw) <= 1e-6 or float(ih) <= 1e-6, (i, j)
    # Distinct centres, each on the grid lattice.
    centres = {(round(float(x) * cols * 2), round(float(y) * rows * 2)) for x, y in boxes[:, :2]}
    assert len(centres) == n
    assert all(a % 2 == 1 and b % 2 == 1 for a, b in centres)


def test_grid_with_incomplete_last_row():
    n = 7  # 2 rows x 4 cols, last cell empty
    xyxy = to_xyxy(initial_proposal_boxes(n, "grid").double())
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
    for i, j in itertools.combinations(range(n), 2):
        iw = min(xyxy[i, 2], xyxy[j, 2]) - max(xyxy[i, 0], xyxy[j, 0])
        ih = min(xyxy[i, 3], xyxy[j, 3]) - max(xyxy[i, 1], xyxy[j, 1])
        assert float(iw) <= 1e-6 or float(ih) <= 1e-6


def test_random_init_inside_and_seeded():
    torch.manual_seed(123)
    a = initial_proposal_boxes(200, "random")
    torch.manual_seed(123)
    b = initial_proposal_boxes(200, "random")
    torch.manual_seed(124)
    c = initial_proposal_boxes(200, "random")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (200, 4)
    assert (a >= 0).all() and (a <= 1).all()
    assert (a[:, 2:] > 0).all()  # positive sizes
    assert len(torch.unique(a[:, 0])) > 100  # actually random, not constant


def test_bad_init_name():
    with pytest.raises(ValueError, match="PROPOSAL_BOX_INIT"):
        initial_proposal_boxes(10, "everywhere")
    with pytest.raises(ValueError):
        LearnableProposals(num_proposals=4, hidden_dim=8, box_init="nope")


def test_learnable_proposals_whole_image():
    gen = LearnableProposals(num_proposals=6, hidden_dim=8, box_init="image")
    image_whwh = torch.tensor([[96.0, 64.0, 96.0, 64.0], [50.0, 80.0, 50.0, 80.0]])
    boxes, features = gen({}, image_whwh)
    assert boxes.shape == (2, 6, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([[0.0, 0.0, 96.0, 64.0]] * 6))
    torch.testing.assert_close(boxes[1], torch.tensor([[0.0, 0.0, 50.0, 80.0]] * 6))
    assert features.shape == (2, 6, 8)
    assert torch.equal(features[0], gen.init_proposal_features.weight)
    assert torch.equal(features[1], gen.init_proposal_features.weight)


def test_learnable_proposals_scaling_and_gradients():
    gen = LearnableProposals(num_proposals=2, hidden_dim=4)
    with torch.no_grad():
        gen.init_proposal_boxes.weight.copy_(
            torch.tensor([[0.25, 0.5, 0.5, 0.2], [0.5, 0.25, 1.0, 0.5]])
        )
    image_whwh = torch.tensor([[100.0, 50.0, 100.0, 50.0], [40.0, 20.0, 40.0, 20.0]])
    boxes, features = gen({}, image_whwh)
    # (0.25, 0.5, 0.5, 0.2) on 100 x 50: centre (25, 25), size (50, 10) -> (0, 20, 50, 30).
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 20.0, 50.0, 30.0]))
    # (0.5, 0.25, 1.0, 0.5) on 40 x 20: centre (20, 5), size (40, 10) -> (0, 0, 40, 10).
    torch.testing.assert_close(boxes[1, 1], torch.tensor([0.0, 0.0, 40.0, 10.0]))
    torch.testing.assert_close(boxes[1, 0], boxes[0, 0] * 0.4)
    # Gradients reach both embeddings, summed over the images.
    (boxes.sum() + features.sum()).backward()
    assert torch.equal(gen.init_proposal_features.weight.grad, torch.full((2, 4), 2.0))
    # d(sum of xyxy)/d(cx, cy, w, h) = (2w_img, 2h_img, 0, 0) summed over images.
    expected = torch.tensor([2 * (100.0 + 40.0), 2 * (50.0 + 20.0), 0.0, 0.0]).expand(2, 4)
    torch.testing.assert_close(gen.init_proposal_boxes.weight.grad, expected)


def test_learnable_proposals_use_box_init():
    for init in ("image", "center", "grid"):
        gen = LearnableProposals(num_proposals=20, hidden_dim=4, box_init=init)
        torch.testing.assert_close(
            gen.init_proposal_boxes.weight.data, initial_proposal_boxes(20, init)
        )
