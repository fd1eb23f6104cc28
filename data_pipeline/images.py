"""Validate one image and make the JPEG bytes a shard stores.

The image is decoded in full (a header that parses is not enough), converted to RGB and
downscaled so the shorter side is at most S and the longer at most L. An RGB JPEG that
needs none of that keeps its original bytes: no generation loss, no wasted CPU.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps

from data_pipeline.shard_format import MAX_MEMBER_BYTES

JPEG_QUALITY = 95
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k: beyond that a header is lying or the file is a bomb
# a source file is read only up to a shard member's cap: ~10x a large camera JPEG
DEFAULT_MAX_FILE_BYTES = MAX_MEMBER_BYTES


class BadImage(ValueError):
    """An image that is skipped and counted; `reason` is the counter's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ImageSettings:
    max_short_side: int = 0   # 0: no downscale
    max_long_side: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger source files are skipped (too_large) unread


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    reencoded: bool


def target_size(width: int, height: int, max_short: int, max_long: int) -> tuple[int, int]:
    """Largest size keeping aspect ratio with short side <= max_short and long side <= max_long."""
    scale = 1.0
    if max_short:
        scale = min(scale, max_short / min(width, height))
    if max_long:
        scale = min(scale, max_long / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(data: bytes, settings: ImageSettings) -> ProcessedImage:
    if not data:
        raise BadImage("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > settings.max_pixels:
                raise BadImage("too_large", f"{width}x{height} pixels exceeds {settings.max_pixels}")
            wanted = target_size(width, height, settings.max_short_side, settings.max_long_side)
            if image.format == "JPEG" and wanted[0] * 2 <= width:
                # Decode at 1/2, 1/4 or 1/8 scale in the DCT: far cheaper, and every byte of
                # the entropy-coded data is still read, so damage is still caught.
                image.draft("RGB", wanted)
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for broken files: all mean "cannot decode"
        raise BadImage("corrupt_image", f"{type(err).__name__}: {err}") from None

    original_format = image.format
    rotated = image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)
    if rotated:  # decoders differ on EXIF orientation: store the image upright, tag removed
        image = ImageOps.exif_transpose(image)
    needs_rgb = image.mode != "RGB"
    if needs_rgb:
        image = _to_rgb(image)
    size = target_size(*image.size, settings.max_short_side, settings.max_long_side)
    resized = size != image.size or image.size != (width, height)
    if resized:
        # Pillow's bilinear filter widens with the reduction (antialiased), so downscaling keeps
        # detail as bicubic does here at ~60% of the cost; the trainer resizes again anyway.
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)

    if original_format == "JPEG" and not (needs_rgb or resized or rotated):
        return ProcessedImage(data, width, height, width, height, reencoded=False)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return ProcessedImage(out.getvalue(), image.width, image.height, width, height, reencoded=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Alpha composited on white (what a viewer shows); CMYK, grayscale, palette converted."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
