"""Stages 4-5 of the loader: decode and resize images on the CPU; tokenize, mask, batch.

`BatchBuilder(pairs, images, generator)` takes images decoded on the CPU (`image`, augmented
when given a draw: data/augment.py); `targets(pairs, generator)` makes the same batch without
them, for DALI (data/decode.py says which of the two a loader uses). `mirror(pair)` is the
pair of a flipped image: its caption's "left" and "right" swapped.

Resize rule (the paper's): scale so the shorter side is S, unless the longer side would
exceed L; then pad into one uint8 batch with pixel masks. The model normalizes on its device.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.augment import Draw, apply, mirror_text
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.types import PretrainBatch, pad_images
from pixelbert_dist.targets import itm_caption_assignment, mask_tokens
from pixelbert_dist.tokenizer import encode_captions, special_tokens

def resized_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    scale = min(short / min(height, width), long / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_resize(jpeg: bytes, short: int, long: int) -> Tensor:
    """(3, h, w) uint8 RGB image. Raises ValueError on an image that does not decode."""
    try:
        image = Image.open(io.BytesIO(jpeg))
        height, width = resized_size(image.height, image.width, short, long)
        image.draft("RGB", (width, height))  # JPEG: decode at 1/2..1/8 scale when that is enough
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    except Exception as err:  # PIL raises many types for a broken file
        raise ValueError(f"image does not decode: {err}") from None
    return TF.pil_to_tensor(image)


class BatchBuilder:
    """Pairs -> PretrainBatch: images padded with masks, ITM negatives, MLM masking.

    ITM swaps the captions of half the pairs for another image's. Every caption is then
    masked, negatives too, so [MASK] tokens say nothing about the ITM label. Every caption's
    MLM labels are handed on: the model counts the matched pairs' only, unless
    `model.mlm_on_mismatched` (model.py, `mlm`; benchmarks/bench_objectives.py says why).
    """

    gpu_decode = True  # one image per pair: the loader may hand the encoded images to DALI

    def __init__(self, tokenizer, cfg: DataConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.special = special_tokens(tokenizer)
        self._decoded: OrderedDict[tuple, Tensor] = OrderedDict()  # consecutive pairs share images
        self.truncated = 0

    def image(self, pair: Pair, draw: Draw | None = None) -> Tensor:
        """The pair's image, resized; augmented by `draw` in training (evaluation gives none)."""
        if (pair.key, draw) not in self._decoded:
            short = draw.short_side if draw else self.cfg.image_short_side
            image = apply(decode_resize(pair.jpeg, short, self.cfg.image_long_side), draw)
            self._decoded[pair.key, draw] = image
            while len(self._decoded) > 64:
                self._decoded.popitem(last=False)
        return self._decoded[pair.key, draw]

    def mirror(self, pair: Pair) -> Pair:
        """The pair as it reads of its horizontally flipped image."""
        return dataclasses.replace(pair, caption=mirror_text(pair.caption))

    def __call__(self, pairs: list[Pair], images: list[Tensor], generator: torch.Generator) -> PretrainBatch:
        """The batch of `pairs`, each with its decoded (3, h, w) uint8 image (`image`), padded."""
        batch = self.targets(pairs, generator)
        firsts, _ = image_rows([p.key for p in pairs])
        batch.images, batch.pixel_mask = pad_images([images[i] for i in firsts], self.cfg.pad_multiple)
        return batch

    def targets(self, pairs: list[Pair], generator: torch.Generator) -> PretrainBatch:
        """The batch of `pairs` without its images (None): DALI decodes them later (data/decode.py)."""
        keys = [p.key for p in pairs]
        # a batch of one image (a one-image shard) cannot have negatives: all pairs match
        fraction = self.cfg.itm_negative_fraction if len(set(keys)) > 1 else 0.0
        caption_index, itm_labels = itm_caption_assignment(keys, fraction, generator)
        captions = [pairs[i].caption for i in caption_index.tolist()]
        encoded = encode_captions(self.tokenizer, captions, self.cfg.max_text_len, keys=keys)
        self.truncated += encoded.num_truncated
        input_ids, mlm_labels = mask_tokens(encoded.input_ids, encoded.attention_mask, self.special,
                                            self.cfg.mlm_probability, generator)
        _, image_index = image_rows(keys)
        return PretrainBatch(None, None, input_ids, encoded.attention_mask, mlm_labels, itm_labels, image_index)


def image_rows(keys: list[str]) -> tuple[list[int], Tensor | None]:
    """The first pair of each distinct image, and each pair's image row (None: all distinct).

    One image row per image: the G pairs of a caption group share one CNN pass.
    """
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        return list(first.values()), None
    row = {key: r for r, key in enumerate(first)}
    return list(first.values()), torch.tensor([row[key] for key in keys])


def drop_images(batch: PretrainBatch, keep_rows: list[int]) -> tuple[PretrainBatch, list[int]]:
    """The batch without the pairs of image rows not in `keep_rows`; returns it and the kept pairs."""
    rows = batch.image_index.tolist() if batch.image_index is not None else list(range(len(batch.input_ids)))
    new_row = {old: new for new, old in enumerate(keep_rows)}
    kept = [i for i, r in enumerate(rows) if r in new_row]
    index = torch.tensor(kept, dtype=torch.long)
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    image_index = torch.tensor([new_row[rows[i]] for i in kept]) if batch.image_index is not None else None
    return PretrainBatch(batch.images, batch.pixel_mask, pick(batch.input_ids), pick(batch.attention_mask),
                         pick(batch.mlm_labels), pick(batch.itm_labels), image_index), kept
