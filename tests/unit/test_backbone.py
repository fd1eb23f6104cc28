"""The CNN trunk with frozen norms folded into its convs computes what the layer-by-layer trunk does."""

import copy
import dataclasses

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from pixelbert_dist.backbone import build_trunk, conv_norm
from pixelbert_dist.model import pad_images


def _frozen_cfg(tiny_cfg, **changes):
    return dataclasses.replace(tiny_cfg.model, train_backbone_norm=False, **changes)


def _with_statistics(trunk, seed=0):
    """Non-trivial frozen statistics: identity norms would make folding a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for m in trunk.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return trunk


BACKBONES = {
    "resnet50": dict(backbone="resnet50"),
    "bottleneck": dict(backbone="custom", backbone_block="bottleneck", backbone_widths=[8, 16, 32, 64]),
    "basic": dict(backbone="custom", backbone_block="basic"),
}


def _padded_inputs(padded, dtype):
    images = torch.randn(2, 3, 128, 192, dtype=dtype)
    if not padded:
        return images, None
    mask = torch.ones(2, 128, 192, dtype=torch.bool)
    mask[1, 70:] = False
    mask[1, :, 100:] = False
    return images * mask[:, None], mask


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_folded_trunk_equals_layer_by_layer_trunk(tiny_cfg, name, padded):
    folded = _with_statistics(build_trunk(_frozen_cfg(tiny_cfg, **BACKBONES[name])))
    reference = copy.deepcopy(folded)
    reference.fold_norms = False
    images, mask = _padded_inputs(padded, torch.float32)
    with torch.no_grad():
        ours, theirs = folded(images, mask), reference(images, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    assert theirs.abs().max() > 0


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_folded_trunk_gives_the_layer_by_layer_gradients(tiny_cfg, name, padded):
    # In float64: a random deep trunk's gradients reach 1e5, where fp32 reassociation noise
    # (the only difference folding makes) is ~1e-2 of the largest; in float64 it is ~1e-12.
    folded = _with_statistics(build_trunk(_frozen_cfg(tiny_cfg, **BACKBONES[name]))).double()
    reference = copy.deepcopy(folded)
    reference.fold_norms = False
    images, mask = _padded_inputs(padded, torch.float64)
    ours, theirs = folded(images, mask), reference(images, mask)
    upstream = torch.randn_like(ours)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    for (key, a), b in zip(folded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10 * b.grad.abs().max().item(), msg=key)
    assert sum(p.grad.abs().sum() for p in reference.parameters()) > 0


@pytest.mark.parametrize("name", ["resnet50", "basic"])
def test_a_padded_image_has_the_features_of_the_image_alone(tiny_cfg, name):
    trunk = _with_statistics(build_trunk(_frozen_cfg(tiny_cfg, **BACKBONES[name]))).eval()
    image = torch.rand(3, 200, 290)
    other = torch.rand(3, 320, 448)
    together, mask = pad_images([image, other])
    with torch.no_grad():
        single = trunk(image[None], None)  # unpadded: the convs' own zero padding at its border
        both = trunk(together, mask)
    rows, cols = single.shape[-2:]  # ceil(200/32) x ceil(290/32)
    assert (rows, cols) == (7, 10)
    torch.testing.assert_close(both[0, :, :rows, :cols], single[0], rtol=1e-4, atol=1e-5 * single.abs().max().item())
    assert both[0, :, rows:].abs().sum() == 0 and both[0, :, :, cols:].abs().sum() == 0


def test_folded_conv_under_bf16_autocast_makes_no_fp32_activation():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    norm = FrozenBatchNorm2d(16)
    norm.running_var.uniform_(0.5, 1.5)
    norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = conv_norm(conv, norm, x)
        layered = conv_norm(conv, norm, x, fold=False)
    assert folded.dtype == torch.bfloat16
    assert layered.dtype == torch.float32  # FrozenBatchNorm2d's fp32 statistics promote it: the cost folded away
    torch.testing.assert_close(folded.float(), layered, rtol=2e-2, atol=2e-2 * layered.abs().max().item())


def test_trainable_norms_stay_batch_norms_and_train(tiny_cfg):
    trunk = build_trunk(dataclasses.replace(tiny_cfg.model, train_backbone_norm=True)).train()
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = norms[0].running_mean.clone()
    trunk(torch.randn(2, 3, 64, 64) + 1.0).sum().backward()
    assert not torch.equal(before, norms[0].running_mean)  # statistics update: a real BatchNorm ran
    assert norms[0].weight.grad is not None


def test_stage_checkpointing_gives_the_same_gradients(tiny_cfg):
    trunk = _with_statistics(build_trunk(_frozen_cfg(tiny_cfg, **BACKBONES["bottleneck"])))
    recomputed = copy.deepcopy(trunk)
    recomputed.checkpoint_stages = True
    images = torch.randn(2, 3, 128, 128)
    mask = torch.ones(2, 128, 128, dtype=torch.bool)
    mask[0, 90:] = False
    trunk(images, mask).square().sum().backward()
    recomputed(images, mask).square().sum().backward()
    for (key, a), b in zip(trunk.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=key)


def test_channels_last_trunk_computes_the_same_features(tiny_cfg):
    trunk = _with_statistics(build_trunk(_frozen_cfg(tiny_cfg, **BACKBONES["bottleneck"]))).eval()
    nhwc = copy.deepcopy(trunk)
    nhwc.channels_last = True
    images = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images), trunk(images), rtol=1e-4, atol=1e-5)
