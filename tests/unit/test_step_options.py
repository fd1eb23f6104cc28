"""The training step's speed and memory options change its cost, not what it computes."""

import copy
import dataclasses

import pytest
import torch

from pixelbert_dist.model import PixelBert, PretrainBatch, pad_images, prepare_for_training
from pixelbert_dist.optim import build_optimizer

CPU = torch.device("cpu")


def _batches(vocab_size, multiple, count=4, seed=0):
    """Batches of images of random sizes, padded to `multiple` as the loader pads them (two canvas shapes)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        sizes = [(int(torch.randint(64, 200, (), generator=gen)), int(torch.randint(64, 260, (), generator=gen)))
                 for _ in range(4)]
        images, mask = pad_images([torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                                   for h, w in sizes], multiple)
        ids = torch.randint(5, vocab_size, (4, 12), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, 2:6] = ids[:, 2:6]
        out.append(PretrainBatch(images, mask, ids, torch.ones_like(ids), labels, torch.tensor([1, 0, 1, 0])))
    return out


def _losses(model, batches, steps):
    torch.manual_seed(0)  # the same pixel sampling draws for every variant
    optimizer = build_optimizer(model, model.cfg_optim)
    losses = []
    for step in range(steps):
        loss = model(batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture
def frozen_tiny(tiny_cfg):
    """The tiny model with frozen norms (the paper's setting, where folding applies)."""
    model = PixelBert(dataclasses.replace(tiny_cfg.model, train_backbone_norm=False)).train()
    model.cfg_optim = tiny_cfg.optim
    return model, tiny_cfg


@pytest.mark.parametrize("option", ["transformer", "cnn", "all"])
def test_activation_checkpointing_gives_the_same_losses(frozen_tiny, option):
    model, cfg = frozen_tiny
    batches = _batches(cfg.model.vocab_size, 64)
    eager = _losses(copy.deepcopy(model), batches, 4)
    recomputed = copy.deepcopy(model)
    prepare_for_training(recomputed, dataclasses.replace(cfg.train, activation_checkpointing=option), CPU)
    assert recomputed.visual.cnn.checkpoint_stages == (option != "transformer")
    assert recomputed.bert.is_activation_checkpointing == (option != "cnn")
    assert _losses(recomputed, batches, 4) == pytest.approx(eager, rel=1e-5)


