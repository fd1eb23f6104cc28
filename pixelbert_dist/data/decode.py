"""Stage 4 of the loader, chosen by name: where a batch's images are decoded.

    decoder = choose_decoder(cfg.data, make_builder, batch_size)   # the one place the choice is made
    decoder.name                                                   # "cpu" or "dali": what the loader reports

    cpu   PIL in the loader worker (batch.py): a batch leaves the worker with its pixels.
    dali  DALI in the training process (dali_decode.py): a batch leaves the worker with the JPEG
          bytes of its image rows and is decoded, resized and padded there, on the GPU.

A decoder has two halves. In the worker, `decode` pairs each pair with its image and `build`
makes a group's batch; in the training process, `finish` completes the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.batch import drop_images, image_rows
from pixelbert_dist.data.dali_decode import resolve_decoder
from pixelbert_dist.data.stream import Pair
from pixelbert_dist.data.types import BatchInfo


class ImageDecoder(Protocol):
    name: str

    def decode(self, pairs: Iterable[Pair], builder) -> Iterator[tuple[Pair, object]]:
        """Each pair with its image as `build` takes it; None where it does not decode."""

    def build(self, builder, pairs: list[Pair], images: list, generator: torch.Generator) -> tuple[object, list | None]:
        """A group's batch, and the JPEG bytes of its image rows that `finish` still has to decode."""

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

    def decode(self, pairs: Iterable[Pair], builder) -> Iterator[tuple[Pair, object]]:
        for pair in pairs:
            try:
                image = builder.image(pair)
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

    def decode(self, pairs: Iterable[Pair], builder) -> Iterator[tuple[Pair, object]]:
        for pair in pairs:
            yield pair, pair.jpeg  # a bad image is found, and its pairs dropped, in `finish`

    def build(self, builder, pairs: list[Pair], images: list, generator: torch.Generator) -> tuple[object, list]:
        return builder.targets(pairs, generator), [images[i] for i in image_rows([p.key for p in pairs])[0]]

    def finish(self, batch, info: BatchInfo) -> tuple[object, BatchInfo]:
        """DALI decode of a batch's images; pairs of an image that does not decode are dropped, counted."""
        if self._dali is None:
            from pixelbert_dist.data.dali_decode import DaliImageDecoder
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            self._dali = DaliImageDecoder(self.cfg.image_short_side, self.cfg.image_long_side,
                                          self.batch_size, device, multiple=self.cfg.pad_multiple)
        batch.images, batch.pixel_mask, kept_rows = self._dali(info.jpegs)
        if len(kept_rows) < len(info.jpegs):
            batch, kept = drop_images(batch, kept_rows)
            info = BatchInfo([info.keys[i] for i in kept], [info.pairs[i] for i in kept], info.consumed,
                             info.skipped + len(info.keys) - len(kept), info.truncated)
        info.jpegs = None
        return batch, info
