"""Model FLOPs, counted by torch's FlopCounterMode on a real forward/backward.

Counting beats a hand formula here: the visual sequence length depends on image size and
pixel sampling, and the CNN's cost on the backbone. MFU = training FLOPs x samples/s / peak FLOP/s.

A pre-training step's FLOPs come from what it trained (`StepFlops`): its valid pixels, and the
valid text and visual tokens of each sequence, each priced by a probe counted once. Photos
are rarely the configured canvas (COCO resizes to ~800x1067, not 800x1333), so a count at the
configured size would overstate MFU by a fifth; padded pixels and padded tokens are computed
but are not useful work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from pixelbert_dist.data.types import IGNORE_INDEX, TOKEN_STRIDE, PretrainBatch
from pixelbert_dist.model import PixelBert


def _count_cpu_attention() -> None:
    # torch counts the CUDA attention kernels but not the CPU flash kernel that SDPA picks
    # here; without this, attention would be missing from every CPU count.
    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention_for_cpu
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward.default in flop_counter.flop_registry:
        return
    flop_counter.register_flop_formula(forward)(
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v))
    flop_counter.register_flop_formula(backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs:
        flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))


_count_cpu_attention()


@dataclass(frozen=True)
class FlopsPerSample:
    forward: float
    backward: float

    @property
    def training(self) -> float:
        return self.forward + self.backward


def synthetic_batch(vocab_size: int, batch_size: int, image_size: tuple[int, int], text_len: int,
                    seed: int = 0) -> PretrainBatch:
    """Random images and captions of fixed shape, every third token an MLM target, half ITM negatives."""
    gen = torch.Generator().manual_seed(seed)
    height, width = image_size
    input_ids = torch.randint(5, vocab_size, (batch_size, text_len), generator=gen)
    mlm_labels = torch.full_like(input_ids, IGNORE_INDEX)
    mlm_labels[:, 1:-1:3] = input_ids[:, 1:-1:3]
    return PretrainBatch(
        images=torch.randint(0, 256, (batch_size, 3, height, width), generator=gen, dtype=torch.uint8),
        pixel_mask=torch.ones(batch_size, height, width, dtype=torch.bool),
        input_ids=input_ids,
        attention_mask=torch.ones(batch_size, text_len, dtype=torch.long),
        mlm_labels=mlm_labels,
        itm_labels=torch.arange(batch_size) % 2,
    )


def measure_flops(model: PixelBert, batch: PretrainBatch) -> FlopsPerSample:
    """FLOPs of one forward and one backward on `batch`, divided by its size.

    Counts in the model's current mode: train mode includes random pixel sampling, which is
    what a pre-training step costs. Gradients are cleared afterwards.
    """
    size = batch.input_ids.shape[0]
    with FlopCounterMode(display=False) as forward_counter:
        loss = model(batch).loss
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return FlopsPerSample(forward_counter.get_total_flops() / size,
                          backward_counter.get_total_flops() / size)


def training_flops_per_sample(model: PixelBert, image_size: tuple[int, int], text_len: int,
                              device: torch.device) -> float:
    """FLOPs of one pre-training sample at `image_size`, counted on a copy of `model` on `device`.

    A copy, and a forked RNG, so that counting changes neither the norms' running statistics
    nor the random stream the training run continues with.
    """
    probe = copy.deepcopy(model).to(device).train()
    batch = synthetic_batch(model.cfg.vocab_size, 1, image_size, text_len).to(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        flops = measure_flops(probe, batch).training
    del probe
    return flops


_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of a pre-training batch from what it holds, on the batch's device (no host wait).

        flops = step_flops(model, (800, 1333), 40, device)   # once, before the engine wraps the model
        timer.end_step(samples=B, flops=flops(batch))        # each micro-step: a 0-d float64 tensor
    """

    per_pixel: float
    """CNN and 1x1 projection, forward and backward, per valid pixel of an image row."""
    per_token: float
    """Transformer layers, pooler and ITM head per token of a sequence (text and visual)."""
    per_token_pair: float
    """Attention products per (query, key) pair of a sequence."""
    per_masked_token: float
    """MLM head per masked text token (the positions that carry a loss)."""
    sample_count: int
    """Visual tokens a sequence keeps in training (model.pixel_sample_count; 0: all)."""

    def __call__(self, batch: PretrainBatch) -> torch.Tensor:
        mask = batch.pixel_mask
        pixels = mask.sum(dtype=torch.float64)
        cells = mask[:, ::TOKEN_STRIDE, ::TOKEN_STRIDE].sum(dim=(1, 2), dtype=torch.float64)  # valid tokens per image
        visual = cells if batch.image_index is None else cells[batch.image_index]
        if self.sample_count > 0:
            visual = visual.clamp(max=self.sample_count)
        tokens = batch.attention_mask.sum(dim=1, dtype=torch.float64) + visual
        masked = (0 if batch.mlm_labels is None else
                  (batch.mlm_labels != IGNORE_INDEX).sum(dtype=torch.float64))
        return (self.per_pixel * pixels + (self.per_token * tokens + self.per_token_pair * tokens**2).sum()
                + self.per_masked_token * masked)


def step_flops(model: torch.nn.Module, image_size: tuple[int, int], text_len: int,
               device: torch.device) -> StepFlops | None:
    """The prices of a StepFlops, counted on copies of `model` (train mode) with one synthetic
    pair at `image_size`; None for a model that is not PixelBert (a task model: its spec counts
    one pair at the configured size)."""
    if not isinstance(model, PixelBert):
        return None
    probe = copy.deepcopy(model).to(device).train()
    batch = synthetic_batch(model.cfg.vocab_size, 1, image_size, text_len).to(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        with FlopCounterMode(display=False) as whole:
            probe(batch).loss.backward()
        with FlopCounterMode(display=False) as visual:
            tokens, _ = probe.visual(batch.images, batch.pixel_mask)
            tokens.float().sum().backward()
        text = torch.randn(1, text_len, model.cfg.hidden_size, device=device, requires_grad=True)
        with FlopCounterMode(display=False) as head:
            probe.cls.predictions(text).float().sum().backward()
    del probe
    total = whole.get_total_flops()
    attention = sum(n for op, n in whole.get_flop_counts()["Global"].items()
                    if any(name in str(op) for name in _ATTENTION_OPS))
    height, width = (-(-side // TOKEN_STRIDE) * TOKEN_STRIDE for side in image_size)  # the canvas the CNN ran on
    cells = (height // TOKEN_STRIDE) * (width // TOKEN_STRIDE)
    count = model.cfg.pixel_sample_count
    length = text_len + (min(count, cells) if count > 0 else cells)
    # the model runs the MLM head on every text position; only the masked ones are useful work
    rest = total - visual.get_total_flops() - attention - head.get_total_flops()
    return StepFlops(per_pixel=visual.get_total_flops() / (height * width), per_token=rest / length,
                     per_token_pair=attention / length**2, per_masked_token=head.get_total_flops() / text_len,
                     sample_count=count)
