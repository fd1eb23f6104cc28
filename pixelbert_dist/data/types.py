"""The batch types and the contract between the data path and the models.

    loader (data/) --PretrainBatch / TaskBatch--> model.py, tasks/

Both sides import them from here, so neither imports the other for them (torchtitan's
components/data/types.py). Only torch and dataclasses: importable without the model's or
the loader's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

BACKBONE_STRIDE = 32
TOKEN_STRIDE = 2 * BACKBONE_STRIDE  # the 2x2 max-pool after the 1x1 conv: one visual token per 64x64 px
IGNORE_INDEX = -100  # label of a position that takes no loss


@dataclass
class PretrainBatch:
    """What the model consumes: padded images and tokenized, masked captions."""

    images: Tensor          # (B, 3, H, W) uint8 RGB, zero where padded
    pixel_mask: Tensor      # (B, H, W) bool, True on real pixels (top-left aligned)
    input_ids: Tensor       # (B, T) long, [CLS] caption [SEP] [PAD]..., MLM-masked
    attention_mask: Tensor  # (B, T) long/bool, 1 on real tokens
    mlm_labels: Tensor | None = None  # (B, T) long, original id where masked else -100
    itm_labels: Tensor | None = None  # (B,) long, 1 matching caption, 0 another image's
    image_index: Tensor | None = None  # (B,) long, the image row of each pair; None: row i is pair i's

    def to(self, device: torch.device | str) -> "PretrainBatch":
        return PretrainBatch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


@dataclass
class TaskBatch:
    """Images (one row per distinct image) and the text sequences that look at them."""

    images: Tensor          # (I, 3, H, W) uint8 RGB, zero where padded (the model normalizes)
    pixel_mask: Tensor      # (I, H, W) bool
    input_ids: Tensor       # (S, T) long: [CLS] text [SEP] [PAD]...
    attention_mask: Tensor  # (S, T)
    image_index: Tensor     # (S,) long: the image row each sequence sees
    labels: Tensor | None = None  # vqa (B, answers) soft scores; nlvr2 (B,) 0/1; retrieval unused

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


class Skipped(NamedTuple):
    """Pairs of one shard skipped for one reason (data/stream.py SKIP_REASONS) in one batch."""

    shard: str
    reason: str
    pairs: int
    first: str  # the first one's error: shard, sample and offset


@dataclass
class BatchInfo:
    """What travels with a batch from a loader worker."""

    keys: list[str]                   # image key of each pair
    pairs: list[tuple[str, int]]      # (shard, pair index) of each pair in the batch
    consumed: dict[str, list[list[int]]]  # every pair read for this batch, skipped ones too
    skipped: int                      # pairs read but not in the batch: damaged, or the image did not decode
    truncated: int                    # captions cut to max_text_len
    jpegs: list[bytes] | None = None  # per image row, when the images are decoded on the GPU
    skips: list[Skipped] = field(default_factory=list)  # where and why `skipped` (DALI's image failures: count only)


def pad_images(images: list[Tensor], multiple: int = TOKEN_STRIDE) -> tuple[Tensor, Tensor]:
    """Stack (3, h, w) images top-left on a zero canvas rounded up to `multiple`; return the mask."""
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    canvas = images[0].new_zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        canvas[i, :, :h, :w] = img
        mask[i, :h, :w] = True
    return canvas, mask


def pixel_mask_from_sizes(sizes: Tensor, height: int, width: int) -> Tensor:
    """(B, height, width) bool, True on each image's top-left h x w: pad_images' mask for `sizes` (B, 2)."""
    rows = torch.arange(height, device=sizes.device) < sizes[:, :1]
    cols = torch.arange(width, device=sizes.device) < sizes[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def image_sizes(pixel_mask: Tensor) -> Tensor:
    """(B, 2) long: the h, w of each image's valid region (the inverse of pixel_mask_from_sizes)."""
    return torch.stack([pixel_mask.any(dim=2).sum(dim=1), pixel_mask.any(dim=1).sum(dim=1)], dim=1)
