"""Model FLOPs per sample, counted by torch's FlopCounterMode on a real forward/backward.

Counting beats a hand formula here: the visual sequence length depends on image size and
pixel sampling, and the CNN's cost on the backbone. MFU = training FLOPs per sample x
samples/s / peak FLOP/s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from pixelbert_dist.data.types import IGNORE_INDEX, PretrainBatch
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
