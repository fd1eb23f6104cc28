"""Stage 4 of the loader, chosen by name: where a batch's images are decoded.

    decoder = choose_decoder(cfg.data, make_builder, batch_size)   # the one place the choice is made
    decoder.name                                                   # "cpu" or "dali": what the loader reports

    cpu   PIL in the loader worker (batch.py): a batch leaves the worker with its pixels.
    dali  DALI in the training process (dali_decode.py): a batch leaves the worker with the JPEG
          bytes of its image rows and is decoded, resized, augmented and padded there, on the GPU.

A decoder has two halves. In the worker, `decode` pairs each pair with its image and `build`
makes a group's batch; in the training process, `finish` completes the batch.

Training augmentation (data.augment_*, augment.py) is drawn in `decode`, per image from (seed,
epoch, shard, key): the CPU path applies it there, DALI in `finish` from the draws that travel
with the bytes. A flipped image's pair is replaced by its mirror (`builder.mirror`: "left" and
"right" swapped in its text) before anything reads the text. Evaluation calls `builder.image`
without a draw: it never augments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.augment import Augmenter
from pixelbert_dist.data.batch import drop_images, image_rows
from pixelbert_dist.data.dali_decode import GraphAugment, resolve_decoder
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.types import BatchInfo


class ImageDecoder(Protocol):
    name: str

    def decode(self, pairs: Iterable[Pair], builder, seed: int, epoch: int) -> Iterator[tuple[Pair, object]]:
        """Each pair (mirrored if its image is flipped) with its image as `build` takes it; None
        where it does not decode. `seed` and `epoch` key the augmentation draws."""

    def build(self, builder, pairs: list[Pair], images: list, generator: torch.Generator) -> tuple[object, list | None]:
        """A group's batch, and what `finish` still has to decode of its image rows ((bytes, draw) each)."""

    def finish(self, batch, info: BatchInfo) -> tuple[object, BatchInfo]:
        """The batch as the model takes it, in the training process."""


def choose_decoder(cfg: DataConfig, make_builder: Callable, batch_size: int) -> ImageDecoder:
    """`data.decoder`, resolved (dali_decode.resolve_decoder), for builders DALI can serve.

    DALI decodes one image per pair: builders that say so (`gpu_decode`: pre-training's) may
    use it; the others (NLVR2's two images) decode on the CPU.
    """
    name = resolve_decoder(cfg.decoder) if getattr(make_builder, "gpu_decode", False) else "cpu"
    return DaliDecoder(cfg, batch_size) if name == "dali" else CpuDecoder()


class CpuDecoder:
    """PIL in the worker: the builder gets decoded images and pads them."""

    name = "cpu"

    def decode(self, pairs: Iterable[Pair], builder, seed: int, epoch: int) -> Iterator[tuple[Pair, object]]:
        for pair, draw in _drawn(pairs, builder, seed, epoch):
            try:
                image = builder.image(pair, draw)
            except ValueError:  # does not decode: skipped, still consumed
                image = None
            yield pair, image

    def build(self, builder, pairs: list[Pair], images: list, generator: torch.Generator) -> tuple[object, None]:
        return builder(pairs, images, generator), None

    def finish(self, batch, info: BatchInfo) -> tuple[object, BatchInfo]:
        return batch, info


class DaliDecoder:
    """DALI in the training process: the builder makes the text side, the images follow as bytes."""

    name = "dali"

    def __init__(self, cfg: DataConfig, batch_size: int) -> None:
        self.cfg, self.batch_size = cfg, batch_size
        self._dali = None  # made in the training process on first use: it owns GPU memory

    def decode(self, pairs: Iterable[Pair], builder, seed: int, epoch: int) -> Iterator[tuple[Pair, object]]:
        for pair, draw in _drawn(pairs, builder, seed, epoch):
            yield pair, (pair.jpeg, draw)  # a bad image is found, and its pairs dropped, in `finish`

    def build(self, builder, pairs: list[Pair], images: list, generator: torch.Generator) -> tuple[object, list]:
        return builder.targets(pairs, generator), [images[i] for i in image_rows([p.key for p in pairs])[0]]

    def finish(self, batch, info: BatchInfo) -> tuple[object, BatchInfo]:
        """DALI decode of a batch's images; pairs of an image that does not decode are dropped, counted."""
        if self._dali is None:
            from pixelbert_dist.data.dali_decode import DaliImageDecoder
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self._dali = DaliImageDecoder(self.cfg.image_short_side, self.cfg.image_long_side, self.batch_size,
                                          device, multiple=self.cfg.pad_multiple, augment=GraphAugment.of(self.cfg))
        jpegs, draws = zip(*info.jpegs) if info.jpegs else ((), ())  # per image row: its bytes and its draw
        batch.images, batch.pixel_mask, kept_rows = self._dali(jpegs, draws)
        if len(kept_rows) < len(info.jpegs):
            batch, kept = drop_images(batch, kept_rows)
            info = BatchInfo([info.keys[i] for i in kept], [info.pairs[i] for i in kept], info.consumed,
                             info.skipped + len(info.keys) - len(kept), info.truncated, skips=info.skips)
        info.jpegs = None
        return batch, info


def _drawn(pairs: Iterable[Pair], builder, seed: int, epoch: int) -> Iterator[tuple[Pair, object]]:
    """Each pair with its image's augmentation draw (None: off), mirrored if the draw flips it."""
    augmenter = Augmenter(builder.cfg, seed, epoch)
    for pair in pairs:
        draw = augmenter.draw(pair.shard, pair.key)
        yield (builder.mirror(pair) if draw is not None and draw.flip else pair), draw
