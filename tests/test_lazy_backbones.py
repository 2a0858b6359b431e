"""Other Detectron2 backbones through LazyConfig: the Swin-T + FPN and ViT + SimpleFeaturePyramid
configs, built at a small size (no pretrained weights), take a training step (the backbone gets
gradients and changes) and run inference on the CPU."""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from conftest import CONFIG_DIR

SMALL_HEAD = [
    "model.num_classes=3",
    "model.head.hidden_dim=32",
    "model.head.nheads=4",
    "model.head.dim_feedforward=64",
    "model.head.dim_dynamic=8",
    "model.head.num_stages=2",
    "model.proposal_generator.num_proposals=10",
    "optimizer.lr=1e-3",
]
SMALL = {
    "sparse_rcnn_swin_T_FPN_300pro_crop_3x": [
        "model.backbone.bottom_up.embed_dim=16",
        "model.backbone.bottom_up.depths=[2,2,2,2]",
        "model.backbone.bottom_up.num_heads=[1,2,2,4]",
        "model.backbone.bottom_up.drop_path_rate=0.0",
    ],
    "sparse_rcnn_vitdet_B_300pro_crop_3x": [
        "model.backbone.net.img_size=64",
        "model.backbone.net.embed_dim=32",
        "model.backbone.net.depth=2",
        "model.backbone.net.num_heads=2",
        "model.backbone.net.window_size=2",
        "model.backbone.net.window_block_indexes=[0]",
        "model.backbone.net.drop_path_rate=0.0",
    ],
}


def small_config(name):
    cfg = LazyConfig.load(str(CONFIG_DIR / f"{name}.py"))
    return LazyConfig.apply_overrides(cfg, SMALL_HEAD + SMALL[name])


def inputs(sizes=((64, 96), (80, 64))):
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in sizes:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]))
        instances.gt_classes = torch.tensor([0, 2])
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backbone_config_builds_trains_a_step_and_infers(name):
    torch.manual_seed(0)
    cfg = small_config(name)
    model = instantiate(cfg.model)
    # The pyramid the head pools from: P2-P5 at strides 4-32, with the head's width.
    shapes = model.backbone.output_shape()
    assert [shapes[f].stride for f in model.in_features] == [4, 8, 16, 32]
    assert {shapes[f].channels for f in model.in_features} == {32}

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    backbone = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    losses = model(inputs())
    assert len(losses) == 3 * 2 and all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, backbone[n])]
    assert len(changed) > len(backbone) // 2

    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in inputs()])
    for x, out in zip(inputs(), outputs):
        result = out["instances"]
        assert result.image_size == (x["height"], x["width"])
        assert len(result) <= 10 and (result.scores[:-1] >= result.scores[1:]).all()
        boxes = result.pred_boxes.tensor
        assert (boxes[:, 0::2] <= x["width"]).all() and (boxes[:, 1::2] <= x["height"]).all()


def test_vit_config_uses_vitdet_layer_decay():
    # ViTDet's layer-wise LR decay (0.7 over 12 blocks) on the backbone; the head keeps the base LR.
    cfg = LazyConfig.load(str(CONFIG_DIR / "sparse_rcnn_vitdet_B_300pro_crop_3x.py"))
    decay = cfg.optimizer.params.lr_factor_func
    assert decay("backbone.net.blocks.11.mlp.fc1.weight") == pytest.approx(0.7)
    assert decay("backbone.net.patch_embed.proj.weight") == pytest.approx(0.7**13)
    assert decay("head.head_series.0.class_logits.weight") == 1.0
