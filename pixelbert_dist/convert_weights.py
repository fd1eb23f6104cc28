"""Detectron's ImageNet ResNeXt-152 32x8d (a Caffe2 .pkl) -> the file `model.backbone_weights` loads.

torchvision has no ImageNet weights for the paper's X152. The public ones are Detectron's
X-152-32x8d-IN5k.pkl (ImageNet-5k, trained with Caffe2 at FB), the file maskrcnn-benchmark and
detectron2 start from. The recipe (download, convert, config line) is in docs/model.md:

    python -m pixelbert_dist.convert_weights X-152-32x8d-IN5k.pkl weights/resnext152_32x8d_imagenet.safetensors

Three things change on the way:
- Names. Detectron names each blob after its graph: `conv1_w`, `res_conv1_bn_{s,b}` for the
  stem, `res{2..5}_{block}_branch2{a,b,c}_w` (+ `_bn_{s,b}`) for a block's three convs and
  `branch1` for its projection shortcut. The trunk keeps torchvision's: `layer{1..4}.{block}.
  conv{1,2,3}`, `bn{1,2,3}`, `downsample.{0,1}`. The classifier (`pred_*`), SGD's `*_momentum`
  and anything else outside the trunk are left out and listed.
- Norms. Detectron ships every batch norm folded into an AffineChannel, y = x * s + b. Our norm
  computes (x - running_mean) / sqrt(running_var + eps) * weight + bias, which is x * s + b for
  weight s, bias b, running_mean 0 and running_var = 1 - eps (1 - eps + eps rounds to 1 in
  float32, so the scale is s itself, not s times a rounding error).
- Pixels. Detectron's model reads BGR pixels in 0-255 minus its means, ours RGB normalised with
  the ImageNet mean and std: conv1 takes its input channels reversed and scaled by 255 x std,
  and the stem norm's bias takes the difference of the means (`_fold_pixel_convention`).

Only FAIR's ResNeXt files fit torchvision's Bottleneck (stride in the 3x3 conv). MSRA's R-50 and
R-101 .pkl put the stride in the first 1x1 conv: they would load and compute another function.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pixelbert_dist.backbone import ResNetTrunk, build_trunk
from pixelbert_dist.config import ModelConfig
from pixelbert_dist.model import IMAGENET_MEAN, IMAGENET_STD

DETECTRON_PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)  # Detectron's cfg.PIXEL_MEANS, on 0-255 BGR pixels

# All a pickled dict of numpy arrays needs beyond pickle's own opcodes (dicts, lists, tuples,
# str, numbers): rebuilding an array and its dtype, under numpy 1.x's module name (what Detectron
# wrote) and numpy 2's; `scalar` for a 0-d blob; `_codecs.encode`, which is how protocol 2 under
# Python 3 writes bytes; OrderedDict. None of them runs code of the file's choosing.
_RECONSTRUCT, _SCALAR = np.zeros(0).__reduce__()[0], np.float32(0).__reduce__()[0]
ALLOWED_GLOBALS = {
    **{(module, name): value for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, value in (("_reconstruct", _RECONSTRUCT), ("scalar", _SCALAR))},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
}

# Detectron's block branches -> (conv, norm) in torchvision's Bottleneck
_BRANCHES = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
             "1": ("downsample.0", "downsample.1")}


class UnsafePickle(ValueError):
    """A weights pickle that names a global a dict of numpy arrays does not need."""


class _BlobUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        # latin1: Python 2's byte strings (the arrays' raw data among them) arrive as str, which numpy reads back
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickle(f"{self.path}: refused the global {module}.{name}: a Caffe2 weights file needs only "
                               f"numpy arrays in a dict; nothing of the file was run. Is it the .pkl you downloaded?")
        return ALLOWED_GLOBALS[(module, name)]


def read_blobs(path: Path) -> dict:
    """The blob dict of a Detectron .pkl: `{"blobs": {...}, ...}` or the blobs themselves."""
    with open(path, "rb") as file:
        try:
            data = _BlobUnpickler(file, path).load()
        except UnsafePickle:
            raise
        except Exception as err:  # a damaged pickle fails in many ways; each means the same here
            raise ValueError(f"{path}: not a readable weights pickle ({type(err).__name__}: {err}); "
                             f"download it again") from None
    blobs = data.get("blobs", data) if isinstance(data, dict) else data
    if not isinstance(blobs, dict):
        raise ValueError(f"{path}: holds a {type(blobs).__name__}, not Detectron's dict of blobs")
    return blobs


def _trunk_place(blob: str) -> tuple[str, str] | None:
    """(module in our trunk, "w" | "s" | "b") of a Detectron trunk blob; None for any other name."""
    if blob == "conv1_w":
        return "conv1", "w"
    if stem := re.fullmatch(r"res_conv1_bn_([sb])", blob):
        return "bn1", stem[1]
    block = re.fullmatch(r"res([2-5])_(\d+)_branch(2a|2b|2c|1)_(w|bn_s|bn_b)", blob)
    if block is None:
        return None
    stage, index, branch, kind = block.groups()
    conv, norm = _BRANCHES[branch]
    return f"layer{int(stage) - 1}.{int(index)}.{conv if kind == 'w' else norm}", kind[-1]


def _fold_pixel_convention(conv1_w: Tensor, stem_scale: Tensor, stem_bias: Tensor) -> tuple[Tensor, Tensor]:
    """conv1's weight and the stem norm's bias for our input, from Detectron's.

    Detectron's conv1 reads c2[k] = p[2 - k] - DETECTRON_MEAN[k]: BGR pixels p in 0-255, no std
    (the ImageNet std was folded into conv1 when the model was made). Ours reads RGB
    x[c] = (p[c] / 255 - MEAN[c]) / STD[c]. So c2[k] = 255 * STD[2 - k] * x[2 - k] + offset[k],
    offset[k] = 255 * MEAN[2 - k] - DETECTRON_MEAN[k]: conv1 takes its input channels in reverse
    order, scaled by 255 * STD, and the offset's response, a constant per output channel, passes
    the stem's AffineChannel as s * response and joins its bias.

    That is exact wherever conv1's 7x7 window lies inside the image. In the 3 border pixels it
    reads zero padding, which meant Detectron's mean grey to Detectron and means the ImageNet mean
    to us: under one 0-255 level apart per channel.
    """
    weight = conv1_w.double()
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    offset = (255 * torch.tensor(IMAGENET_MEAN[::-1], dtype=torch.float64)
              - torch.tensor(DETECTRON_PIXEL_MEANS_BGR, dtype=torch.float64))
    response = (weight.sum(dim=(2, 3)) * offset).sum(dim=1)  # per output channel, Detectron's BGR order
    ours = weight.flip(1) * (255 * std)
    return ours.to(conv1_w.dtype), (stem_bias.double() + stem_scale.double() * response).to(stem_bias.dtype)


def convert(blobs: Mapping, trunk: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """`trunk`'s state dict from Detectron's blobs, and the names of the blobs left out (not the trunk's).

    `trunk` (it may live on the meta device) says which entries to fill, their shapes and each
    norm's eps. Every entry must get a value of its shape and every trunk blob a place: a
    ValueError names the blob or entry otherwise.
    """
    values: dict[tuple[str, str], Tensor] = {}
    blob_at: dict[tuple[str, str], str] = {}
    left_out, unknown = [], []
    for blob, array in blobs.items():
        blob = str(blob)
        if blob.endswith("_momentum") or not blob.startswith(("conv1_", "res")):
            left_out.append(blob)
            continue
        place = _trunk_place(blob)
        if place is None:
            unknown.append(blob)
            continue
        if not (isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"Detectron blob {blob} is a {getattr(array, 'dtype', type(array).__name__)}, "
                             f"not an array of floats")
        # a copy unless numpy lends a writable buffer (an array over a pickle's bytes is read-only)
        values[place] = torch.from_numpy(array if array.flags.writeable else array.copy()).float()
        blob_at[place] = blob
    if unknown:
        raise ValueError(f"Detectron blobs {sorted(unknown)} look like the trunk's but match no layer of ours "
                         f"(an unfused BatchNorm, a bias, a GroupNorm model?): only X-152-32x8d-IN5k.pkl's "
                         f"layout is known")

    state, source = {}, {}
    for (module, kind), value in values.items():
        blob = blob_at[module, kind]
        if kind == "w":
            entries = {f"{module}.weight": value}
        else:
            try:
                eps = trunk.get_submodule(module).eps  # no such module, or not a norm
            except AttributeError:
                raise ValueError(f"Detectron blob {blob}: our backbone has no norm {module}: "
                                 f"is the file another depth?") from None
            entries = {f"{module}.{'weight' if kind == 's' else 'bias'}": value,
                       f"{module}.running_mean": torch.zeros_like(value),
                       f"{module}.running_var": torch.full_like(value, 1.0 - eps)}
        for key, tensor in entries.items():
            state[key] = tensor
            source.setdefault(key, blob)

    expected = {k: v.shape for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    extra = sorted(f"{source[k]} (as {k})" for k in state.keys() - expected.keys())
    if extra:
        raise ValueError(f"Detectron blobs {extra} have no place in our backbone: is the file another depth?")
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ValueError(f"no Detectron blob gives our backbone's {missing[:5]}"
                         f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: is the file another depth?")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"Detectron blob {source[key]} has shape {tuple(state[key].shape)}; our {key} "
                             f"needs {tuple(shape)}: is the file another width or cardinality?")
    state["conv1.weight"], state["bn1.bias"] = _fold_pixel_convention(
        state["conv1.weight"], state["bn1.weight"], state["bn1.bias"])
    return state, sorted(left_out)


def x152_trunk() -> ResNetTrunk:
    """Our ResNeXt-152 32x8d trunk on the meta device: its names, shapes and norms, no memory."""
    with torch.device("meta"):
        return build_trunk(ModelConfig(backbone="resnext152_32x8d", backbone_weights="none"))


def convert_file(pkl: str | Path, out: str | Path, trunk: nn.Module) -> list[str]:
    """Convert Detectron's `pkl` for `trunk` into the safetensors file `out`; the blobs left out."""
    from safetensors.torch import save_file

    try:
        state, left_out = convert(read_blobs(Path(pkl)), trunk)
    except UnsafePickle:
        raise
    except ValueError as err:
        raise ValueError(f"{pkl}: {err}") from None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"format": "pt", "converted_from": Path(pkl).name})
    return left_out


def _summary(names: list[str]) -> str:
    momentum = [n for n in names if n.endswith("_momentum")]
    others = [n for n in names if not n.endswith("_momentum")]
    return ", ".join(([f"{len(momentum)} *_momentum (SGD state)"] if momentum else []) + others) or "nothing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelbert_dist.convert_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pkl", help="Detectron's X-152-32x8d-IN5k.pkl")
    parser.add_argument("out", help="the .safetensors file to write (then --model.backbone_weights=OUT)")
    args = parser.parse_args(argv)
    try:
        left_out = convert_file(args.pkl, args.out, x152_trunk())
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"left out (not the trunk): {_summary(left_out)}")
    print(f"wrote {args.out}; use it with model.backbone_weights: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
