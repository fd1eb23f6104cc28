"""Pre-training targets built on the CPU side of a batch: MLM masking and ITM negatives.

Both draw from a `torch.Generator`, so a seeded loader makes the same targets on a rerun.
Masking is applied to every caption, matching or not: if only matching pairs carried
[MASK] tokens, their presence would tell the ITM head the answer. Which masked words the
MLM loss counts (matched pairs only, by default) is the model's choice (`PixelBert.mlm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pixelbert_dist.data.types import IGNORE_INDEX

MASK_FRACTION = 0.8    # of selected tokens: replaced by [MASK]
RANDOM_FRACTION = 0.1  # replaced by a random token; the remaining 10% stay unchanged


@dataclass(frozen=True)
class SpecialTokens:
    """The ids masking must know about."""

    mask_id: int
    special_ids: tuple[int, ...]  # [CLS], [SEP], [PAD], [UNK]...: never selected
    vocab_size: int


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, special: SpecialTokens,
                probability: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking: select `probability` of the real, non-special tokens; 80/10/10 them.

    Returns (masked input ids, labels) with labels = original id where selected, else -100.
    """
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special.special_ids))
    selected = (torch.rand(input_ids.shape, generator=generator) < probability) & eligible
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (action < MASK_FRACTION)
    to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    random_ids = torch.randint(special.vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[to_mask] = special.mask_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def itm_caption_assignment(image_keys: Sequence[str], negative_fraction: float,
                           generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Choose which caption each image is paired with for image-text matching.

    Returns (caption index per pair, ITM label per pair). round(B * fraction) pairs, chosen
    at random, get the caption of a *different* image (a different key, so a second
    caption of the same image is never a negative); the rest keep their own.
    """
    size = len(image_keys)
    ids = {key: i for i, key in enumerate(dict.fromkeys(image_keys))}
    image_ids = torch.tensor([ids[key] for key in image_keys])
    caption_index = torch.arange(size)
    labels = torch.ones(size, dtype=torch.long)
    num_negatives = round(size * negative_fraction)
    if num_negatives == 0:
        return caption_index, labels
    if len(ids) < 2:
        raise ValueError(f"ITM negatives need at least two distinct images in a batch; got {size} "
                         f"pairs of one image ({image_keys[0]!r})")
    negatives = torch.randperm(size, generator=generator)[:num_negatives]
    others = (image_ids[negatives, None] != image_ids[None, :]).float()
    caption_index[negatives] = torch.multinomial(others, 1, generator=generator).squeeze(1)
    labels[negatives] = 0
    return caption_index, labels
