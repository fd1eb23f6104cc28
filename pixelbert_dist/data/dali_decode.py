"""Stage 4 of the loader on NVIDIA DALI: decode, resize and pad a batch in one pipeline.

A drop-in for `batch.decode_resize` on every image, then `augment.apply`, then `types.pad_images`:

    decoder = DaliImageDecoder(short_side=800, long_side=1333, max_batch_size=32, device_id=local_rank)
    images, pixel_mask, kept = decoder([pair.jpeg for pair in pairs])   # kept: indices that decoded
    decoder(jpegs, draws)   # with augmentation (GraphAugment.of(cfg) at construction): each image's Draw

Same output as the CPU path: uint8 pixels (the model normalizes), sizes by `resized_size`
(computed here from the image header and fed to the pipeline, so no second rounding rule
exists), zero padding to the same multiple (data.pad_multiple), the same mask. Pixel values differ by a
few grey levels: PIL decodes large downscales at 1/2..1/8 scale in the DCT domain and then
resizes; DALI decodes at full size and resizes with an antialiased cubic filter
(tests/unit/test_dali_decode.py states the measured gap).

Encoded bytes come from our own streaming loader through `external_source`, so sharding,
shuffling and resumption stay in one place; DALI only replaces the image arithmetic. So do the
augmentation parameters: drawn on the host (augment.py), fed per sample, applied in the same graph
between the resize and the padding, on the GPU with no extra copy. The graph holds only the stages
the config can draw; with augmentation off it is the plain decode-resize-pad graph.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pixelbert_dist.config import DataConfig
from pixelbert_dist.data.augment import GREY, SHARPEN_BLUR, Draw
from pixelbert_dist.data.batch import resized_size
from pixelbert_dist.data.types import TOKEN_STRIDE, pixel_mask_from_sizes
from pixelbert_dist.data.wire import check_image_sizes

if TYPE_CHECKING:
    from nvidia.dali import Pipeline

log = logging.getLogger(__name__)

DecoderChoice = Literal["cpu", "dali"]


@dataclass(frozen=True)
class GraphAugment:
    """The augmentation stages a DALI graph holds: those the config can draw (multi-scale needs none)."""

    flip: bool = False
    colour: bool = False       # brightness, contrast, saturation
    randaugment: bool = False  # warp, sharpness, posterize, autocontrast, equalize, and the colours

    @classmethod
    def of(cls, cfg: DataConfig) -> "GraphAugment":
        return cls(cfg.augment_flip > 0, cfg.augment_color_jitter > 0, cfg.augment_randaugment > 0)

    def inputs(self, draws: list[Draw | None], sizes: list[tuple[int, int]]) -> dict[str, list[np.ndarray]]:
        """The per-sample arguments of the graph's stages, from each image's draw (None: untouched)."""
        draws = [d or Draw(0) for d in draws]
        inputs = {}
        if self.flip:
            inputs["flip"] = [np.array(d.flip, dtype=np.int32) for d in draws]
        if self.randaugment:
            inputs["matrix"] = [d.inverse_affine(*size) for d, size in zip(draws, sizes)]
            inputs["tones"] = [np.array([256 - 2 ** (8 - d.posterize), d.autocontrast, d.equalize], dtype=np.uint8)
                               for d in draws]
        if self.colour or self.randaugment:
            inputs["factors"] = [np.array([d.brightness, d.contrast, d.saturation, d.sharpness], dtype=np.float32)
                                 for d in draws]
        return inputs


def build_pipeline(max_batch_size: int, device_id: int | None, num_threads: int = 2,
                   multiple: int = TOKEN_STRIDE, augment: GraphAugment = GraphAugment()) -> "Pipeline":
    """The DALI graph, defined but not built: inputs "jpegs" (encoded bytes) and "sizes" ([h, w]),
    and the per-sample augmentation arguments `augment.inputs` names.

    device_id=None runs every operator on the CPU; otherwise decoding is "mixed" (nvJPEG, with
    the GPU's hardware JPEG engine where it has one) and the rest runs on that GPU. Defining the
    graph checks operator argument names and input devices, and needs no GPU; `build()` does.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    # One batch in flight: the caller feeds a batch and waits for it. Overlap with the model
    # comes from the loader's workers preparing the next batch's bytes meanwhile.
    pipe = Pipeline(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id,
                    prefetch_queue_depth=1)
    with pipe:
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
        sizes = fn.external_source(name="sizes", dtype=types.FLOAT, ndim=1)
        if device_id is None:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)
        else:
            # fancy upsampling: the chroma upsampling libjpeg-turbo (and so PIL) uses
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                       jpeg_fancy_upsampling=True)
        # adjust_orientation=False above: the CPU path does not apply EXIF rotation either.
        # Cubic + antialias is the closest of DALI's filters to PIL's bicubic (linear: 2x the gap).
        images = fn.resize(images, size=sizes, interp_type=types.INTERP_CUBIC, antialias=True)
        images = _augment(images, augment)
        images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW, still uint8
        # pad H and W to the batch maximum rounded up to `multiple`, top-left: pad_images' layout
        images = fn.pad(images, axes=(1, 2), align=(multiple, multiple), fill_value=0)
        pipe.set_outputs(images)
    return pipe


def _augment(images, augment: GraphAugment):
    """augment.apply in DALI operators, on HWC uint8 images: the same stages, order and formulas.

    Every image passes every stage the graph holds, the ones whose draw is neutral with an identity
    argument (factor 1, mask 255, flag 0): cheaper on a GPU than splitting the batch per op.
    Per-sample arguments come from the host (CPU); arithmetic moves them to the GPU itself.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    if augment.flip:
        images = fn.flip(images, horizontal=fn.external_source(name="flip", dtype=types.INT32, ndim=0))
    if augment.randaugment:
        matrix = fn.external_source(name="matrix", dtype=types.FLOAT, ndim=2)
        images = fn.warp_affine(images, matrix=matrix, fill_value=0, interp_type=types.INTERP_LINEAR)
    if augment.colour or augment.randaugment:
        factors = fn.external_source(name="factors", dtype=types.FLOAT, ndim=1)
        grey = types.Constant(np.array(GREY, dtype=np.float32), device=images.device)

        def luma(x):
            return fn.reductions.sum(x * grey, axes=2, keep_dims=True)

        x = fn.cast(images, dtype=types.FLOAT)
        x = dmath.clamp(x * factors[0], 0.0, 255.0)
        mean = fn.reductions.mean(luma(x))
        x = dmath.clamp(mean + (x - mean) * factors[1], 0.0, 255.0)
        x = dmath.clamp(luma(x) + (x - luma(x)) * factors[2], 0.0, 255.0)
        if augment.randaugment:
            blur = types.Constant(SHARPEN_BLUR, device=images.device)
            blurred = fn.filter(x, blur, border="reflect_101")
            x = dmath.clamp(blurred + (x - blurred) * factors[3], 0.0, 255.0)
        images = fn.cast(x, dtype=types.UINT8)
    if augment.randaugment:
        tones = fn.external_source(name="tones", dtype=types.UINT8, ndim=1)  # posterize mask, two flags
        one = types.Constant(1, dtype=types.UINT8)  # a Python 1 would promote the uint8 images to int32
        images = images & tones[0]
        lo = fn.reductions.min(images, axes=[0, 1], keep_dims=True)
        hi = fn.reductions.max(images, axes=[0, 1], keep_dims=True)
        stretched = (fn.cast(images, dtype=types.FLOAT) - lo) * (255.0 / dmath.max(hi - lo, 1))
        # a flat channel (hi == lo) is left as it is
        stretched = fn.cast(dmath.clamp(stretched, 0.0, 255.0), dtype=types.UINT8) * (hi > lo) + images * (hi == lo)
        images = stretched * tones[1] + images * (tones[1] ^ one)
        images = fn.equalize(images) * tones[2] + images * (tones[2] ^ one)
    return images


class DaliImageDecoder:
    """Encoded images -> (images (B',3,H,W) uint8, pixel_mask (B',H,W) bool, kept indices).

    Outputs live on `cuda:device_id`, or on the CPU when device_id is None. Images that do not
    decode are dropped, logged and counted in `skipped`; `kept` lists the input indices that
    made it, in order, so the caller can drop the matching captions.
    """

    def __init__(self, short_side: int, long_side: int, max_batch_size: int, device_id: int | None,
                 num_threads: int = 2, multiple: int = TOKEN_STRIDE, augment: GraphAugment = GraphAugment()) -> None:
        self.short_side, self.long_side, self.multiple, self.augment = short_side, long_side, multiple, augment
        self.max_batch_size, self.device_id, self.num_threads = max_batch_size, device_id, num_threads
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.skipped = 0
        self._pipe = self._build()

    def _build(self) -> "Pipeline":
        pipe = build_pipeline(self.max_batch_size, self.device_id, self.num_threads, self.multiple, self.augment)
        pipe.build()
        return pipe

    def __call__(self, jpegs: Sequence[bytes], draws: Sequence[Draw | None] | None = None
                 ) -> tuple[Tensor, Tensor, list[int]]:
        """`draws`: each image's augmentation (augment.py); its short side replaces short_side."""
        if len(jpegs) > self.max_batch_size:
            raise ValueError(f"{len(jpegs)} images exceed max_batch_size={self.max_batch_size}")
        draws = list(draws) if draws is not None else [None] * len(jpegs)
        # The header gives the size, and rejects non-images before DALI sees them.
        sizes = {i: size for i, (jpeg, draw) in enumerate(zip(jpegs, draws))
                 if (size := self._target_size(i, jpeg, draw.short_side if draw else self.short_side))}
        kept = list(sizes)
        try:
            images = self._run([jpegs[i] for i in kept], [sizes[i] for i in kept], [draws[i] for i in kept])
        except RuntimeError:
            # A body that does not decode (a truncated file, say) fails the whole batch, and DALI
            # does not say reliably which sample it was. Decoding each image alone finds the bad
            # ones; it costs a batch's worth of small runs, paid only on a batch that holds one.
            # DALI declares a pipeline invalid after an error, so each failure rebuilds it.
            self._pipe = self._build()
            kept = [i for i in kept if self._decodes(i, jpegs[i], sizes[i], draws[i])]
            images = self._run([jpegs[i] for i in kept], [sizes[i] for i in kept], [draws[i] for i in kept])
        self.skipped += len(jpegs) - len(kept)
        kept_sizes = torch.tensor([sizes[i] for i in kept], dtype=torch.long).view(-1, 2)
        check_image_sizes(kept_sizes)  # here, on the host: the model does not check on a GPU
        if self.device.type == "cuda":  # pinned, so the copy is queued and the host goes on
            kept_sizes = kept_sizes.pin_memory().to(self.device, non_blocking=True)
        return images, pixel_mask_from_sizes(kept_sizes, *images.shape[-2:]), kept

    def _target_size(self, index: int, jpeg: bytes, short_side: int) -> tuple[int, int] | None:
        try:
            with Image.open(io.BytesIO(jpeg)) as image:  # reads the header only
                return resized_size(image.height, image.width, short_side, self.long_side)
        except Exception as err:  # PIL raises many types for a broken header
            log.warning("skipping image %d of the batch: unreadable header (%s)", index, err)
            return None

    def _decodes(self, index: int, jpeg: bytes, size: tuple[int, int], draw: Draw | None) -> bool:
        try:
            self._run([jpeg], [size], [draw])
            return True
        except RuntimeError as err:
            log.warning("skipping image %d of the batch: %s", index, str(err).strip().splitlines()[-1])
            self._pipe = self._build()
            return False

    def _run(self, jpegs: list[bytes], sizes: list[tuple[int, int]], draws: list[Draw | None]) -> Tensor:
        if not jpegs:
            return torch.zeros(0, 3, 0, 0, dtype=torch.uint8, device=self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray
        (out,) = self._pipe.run(jpegs=[np.frombuffer(j, dtype=np.uint8) for j in jpegs],
                                sizes=[np.asarray(s, dtype=np.float32) for s in sizes],
                                **self.augment.inputs(draws, sizes))
        dense = out.as_tensor()  # padded, so every sample has the same shape
        # A copy, not a DLPack view: DALI reuses its output buffer on the next run.
        images = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, images, cuda_stream=stream)
        return images


def resolve_decoder(choice: str) -> DecoderChoice:
    """`data.decoder` -> the image path to use: "cpu" (PIL) or "dali".

    "auto" picks DALI only where it pays: a CUDA GPU and an importable DALI. On the CPU,
    DALI is no faster than PIL per core (benchmarks/results/loader_*), so auto keeps PIL there.
    An explicit "dali" without a GPU runs DALI's CPU operators; without DALI it is an error.
    """
    if choice not in ("cpu", "dali", "auto"):
        raise ValueError(f"data.decoder must be cpu, dali or auto, not {choice!r}")
    if choice == "cpu":
        return "cpu"
    missing = _dali_import_error()
    if choice == "dali":
        if missing:
            raise RuntimeError(f"data.decoder=dali but nvidia.dali does not import: {missing}")
        return "dali"
    if not torch.cuda.is_available():
        log.info("data.decoder=auto -> cpu: no CUDA GPU, and DALI gains nothing over PIL on the CPU")
        return "cpu"
    if missing:
        log.warning("data.decoder=auto -> cpu: a GPU is present but nvidia.dali does not import (%s)", missing)
        return "cpu"
    return "dali"


def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:  # ImportError, or an OSError from a missing CUDA library
        return f"{type(err).__name__}: {err}"
    return None
