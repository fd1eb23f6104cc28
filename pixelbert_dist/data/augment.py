"""Training-time image augmentation: each image's parameters, drawn from its identity, and the CPU path.

    augmenter = Augmenter(cfg.data, seed, epoch)          # the data.augment_* policy of one epoch
    draw = augmenter.draw(pair.shard, pair.key)           # None when augmentation is off
    image = decode_resize(jpeg, draw.short_side, long)    # multi-scale: the drawn shorter side, long side capped
    image = apply(image, draw)                            # flip, warp, colours: torchvision / torch on the CPU
    text = mirror_text(caption)                           # a flipped image's text: "left" <-> "right"

DALI (dali_decode.py) applies the same `Draw` in its decode graph, so the two paths differ only
by resampling. A draw is a pure function of (seed, epoch, shard, image key): a resumed run, on
any number of ranks or workers, gives each image the same augmentation, and every pair of one
image (captions_per_image runs, a caption repeated in a batch) shares its one image row. It is
keyed by the image, not the caption, for that reason: pairs of one image share a CNN pass.

The policy is ViLT's fine-tuning RandAugment (torchvision's magnitudes) without what changes what
a caption says: no colour inversion, no solarize (an inversion above a threshold: "a white dog"
turns dark), no cutout (it erases the small objects a caption names). A draw's ops are applied in
one fixed order, whatever order they were drawn in: the geometric ones as one affine warp (one
resampling), then brightness, contrast, saturation, sharpness in float, rounded once, then
posterize, autocontrast, equalize.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pixelbert_dist.config import DataConfig

# ViLT's RandAugment list (vilt/transforms/randaug.py) less Invert, SolarizeAdd, Cutout (ViLT drops
# those too) and Solarize
RANDAUGMENT_OPS = ("auto_contrast", "equalize", "rotate", "posterize", "color", "contrast", "brightness",
                   "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
GREY = (0.299, 0.587, 0.114)  # PIL's luma weights: its Contrast and Color blend towards this grey
SHARPEN_BLUR = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13  # PIL's SMOOTH filter


@dataclass(frozen=True)
class Draw:
    """One image's augmentation. The neutral values are no-ops."""

    short_side: int
    flip: bool = False
    angle: float = 0.0          # degrees, counter-clockwise, about the image's centre
    shear: tuple[float, float] = (0.0, 0.0)      # x, y: tan of the shear angle
    translate: tuple[float, float] = (0.0, 0.0)  # x, y: fractions of the width, height
    brightness: float = 1.0     # factors: 1 leaves the image as it is
    contrast: float = 1.0
    saturation: float = 1.0
    sharpness: float = 1.0
    posterize: int = 8          # bits kept per channel
    autocontrast: bool = False
    equalize: bool = False

    @property
    def warps(self) -> bool:
        return self.angle != 0 or self.shear != (0.0, 0.0) or self.translate != (0.0, 0.0)

    def inverse_affine(self, height: int, width: int) -> np.ndarray:
        """(2, 3) float32: output pixel (x, y) -> where it is read in the input, pixel centres at +0.5."""
        cx, cy = width / 2, height / 2
        theta = math.radians(self.angle)
        rotate = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        shear = np.array([[1.0, 0.0], [self.shear[1], 1.0]]) @ np.array([[1.0, self.shear[0]], [0.0, 1.0]])
        forward = rotate @ shear
        inverse = np.linalg.inv(forward)
        shift = np.array([cx + self.translate[0] * width, cy + self.translate[1] * height])
        return np.hstack([inverse, (np.array([cx, cy]) - inverse @ shift)[:, None]]).astype(np.float32)


class Augmenter:
    """The data.augment_* policy of one (seed, epoch): `draw(shard, key)` gives an image's parameters."""

    def __init__(self, cfg: DataConfig, seed: int, epoch: int) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, epoch
        self.on = bool(cfg.augment_short_sides or cfg.augment_flip or cfg.augment_color_jitter
                       or cfg.augment_randaugment)

    def draw(self, shard: str, key: str) -> Draw | None:
        """The image's augmentation, from (seed, epoch, shard, key) alone; None when augmentation is off."""
        if not self.on:
            return None
        cfg = self.cfg
        digest = hashlib.blake2b(f"{shard}\0{key}".encode(), digest_size=16).digest()
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, int.from_bytes(digest, "little")])
        # always the same five numbers first: turning one option on does not change the others' draws
        scale, flip, *jitter = rng.random(5).tolist()
        sides = cfg.augment_short_sides or [cfg.image_short_side]
        x = cfg.augment_color_jitter
        b, c, s = (1 - x + 2 * x * u for u in jitter)
        draw = Draw(sides[int(scale * len(sides))], flip < cfg.augment_flip, brightness=b, contrast=c, saturation=s)
        ops = rng.integers(len(RANDAUGMENT_OPS), size=cfg.augment_randaugment).tolist()
        signs = np.where(rng.random(cfg.augment_randaugment) < 0.5, -1.0, 1.0).tolist()
        for op, sign in zip(ops, signs):
            draw = _randaugment(draw, RANDAUGMENT_OPS[op], sign, cfg.augment_randaugment_magnitude / 30)
        return draw


def _randaugment(draw: Draw, op: str, sign: float, m: float) -> Draw:
    """`draw` with one RandAugment op added at strength m (0-1): torchvision's ranges. An op drawn
    twice composes (angles add, factors multiply)."""
    if op == "rotate":
        return dataclasses.replace(draw, angle=draw.angle + sign * 30.0 * m)
    if op in ("shear_x", "shear_y"):
        i = op == "shear_y"
        shear = list(draw.shear)
        shear[i] += sign * 0.3 * m
        return dataclasses.replace(draw, shear=tuple(shear))
    if op in ("translate_x", "translate_y"):
        i = op == "translate_y"
        translate = list(draw.translate)
        translate[i] += sign * 150.0 / 331.0 * m
        return dataclasses.replace(draw, translate=tuple(translate))
    if op in ("brightness", "contrast", "sharpness"):
        return dataclasses.replace(draw, **{op: getattr(draw, op) * (1 + sign * 0.9 * m)})
    if op == "color":
        return dataclasses.replace(draw, saturation=draw.saturation * (1 + sign * 0.9 * m))
    if op == "posterize":
        return dataclasses.replace(draw, posterize=min(draw.posterize, 8 - int(np.round(m * 4))))
    return dataclasses.replace(draw, **{"autocontrast" if op == "auto_contrast" else op: True})


_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_text(text: str) -> str:
    """`text` as it reads of the mirrored image: whole words "left" and "right" swapped, case kept."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _SIDE_WORDS.sub(swap, text)


# ---------------------------------------------------------------------------- the CPU path

def apply(image: Tensor, draw: Draw | None) -> Tensor:
    """A (3, h, w) uint8 image, already resized to the draw's size, augmented by `draw` (dali_decode.py's
    graph, op for op: the same formulas, so only resampling differs)."""
    if draw is None:
        return image
    if draw.flip:
        image = image.flip(-1)
    if draw.warps:
        image = _warp(image, draw.inverse_affine(*image.shape[-2:]))
    if (draw.brightness, draw.contrast, draw.saturation, draw.sharpness) != (1.0, 1.0, 1.0, 1.0):
        x = image.float()  # in place from here: at 800x1333 each temporary costs milliseconds
        if draw.brightness != 1.0:
            x.mul_(draw.brightness).clamp_(0, 255)
        if draw.contrast != 1.0:
            mean = _grey(x).mean()
            x.sub_(mean).mul_(draw.contrast).add_(mean).clamp_(0, 255)
        if draw.saturation != 1.0:
            grey = _grey(x)
            x.sub_(grey).mul_(draw.saturation).add_(grey).clamp_(0, 255)
        if draw.sharpness != 1.0:
            blurred = _smooth(x)
            x.sub_(blurred).mul_(draw.sharpness).add_(blurred).clamp_(0, 255)
        image = x.round_().to(torch.uint8)
    if draw.posterize < 8:
        image = image & (256 - 2 ** (8 - draw.posterize))
    if draw.autocontrast:
        image = _autocontrast(image)
    if draw.equalize:
        image = _equalize(image)
    return image


def _grey(x: Tensor) -> Tensor:
    """(h, w): PIL's luma of a (3, h, w) float image."""
    return x[0] * GREY[0] + x[1] * GREY[1] + x[2] * GREY[2]


def _smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) with mirrored borders (DALI's
    reflect_101), as a separable 3x3 box sum plus 4x the centre: a tenth of conv2d's time."""
    padded = F.pad(x[None], (1, 1, 1, 1), mode="reflect")[0]
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    return box.add_(x, alpha=4).div_(13)


def _warp(image: Tensor, inverse: np.ndarray) -> Tensor:
    """Bilinear affine warp, zero outside, the output the input's size (DALI's warp_affine)."""
    height, width = image.shape[-2:]
    # pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel centres at +0.5)
    to_unit = np.array([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]])
    theta = to_unit @ np.vstack([inverse, [0, 0, 1]]) @ np.linalg.inv(to_unit)
    grid = F.affine_grid(torch.from_numpy(theta[:2]).float()[None], [1, 3, height, width], align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _autocontrast(image: Tensor) -> Tensor:
    """Each channel stretched to 0..255 (a flat channel is left as it is)."""
    lo = image.amin(dim=(1, 2), keepdim=True).float()
    hi = image.amax(dim=(1, 2), keepdim=True).float()
    flat = hi == lo
    scale = torch.where(flat, 1.0, 255.0 / (hi - lo).clamp(min=1))
    return ((image.float() - torch.where(flat, 0.0, lo)) * scale).round_().clamp_(0, 255).to(torch.uint8)


def _equalize(image: Tensor) -> Tensor:
    """Per-channel histogram equalization as OpenCV (and so DALI's equalize) computes it."""
    out = torch.empty_like(image)
    for channel, values in enumerate(image):
        hist = torch.bincount(values.flatten().long(), minlength=256)
        first = int(torch.nonzero(hist)[0])
        rest = values.numel() - int(hist[first])
        if rest == 0:  # one value: nothing to spread
            out[channel] = values
            continue
        lut = ((hist.cumsum(0) - hist[first]).double() * (255.0 / rest)).round().clamp(0, 255).to(torch.uint8)
        out[channel] = lut[values.long()]
    return out
