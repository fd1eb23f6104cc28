"""Detectron's Caffe2 ResNeXt weights, converted, make our trunk compute what the Caffe2 model computes.

The test writes its own Detectron files: blob names and shapes follow Detectron's ResNet builder
(`add_ResNet_convX_body` in detectron/modeling/ResNet.py), not the converter's mapping, and the
reference forward below runs Detectron's graph on those names: BGR pixels 0-255 minus Detectron's
means, AffineChannel after every conv.
"""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from pixelbert_dist import convert_weights
from pixelbert_dist.backbone import ResNetTrunk, _load_backbone_file, build_trunk
from pixelbert_dist.config import ModelConfig
from pixelbert_dist.model import IMAGENET_MEAN, IMAGENET_STD

DETECTRON_MEANS_BGR = torch.tensor([102.9801, 115.9465, 122.7717], dtype=torch.float64)  # Detectron's PIXEL_MEANS

SMALL = dict(blocks=(1, 2, 1, 1), groups=4, width_per_group=4)  # both kinds of shortcut, grouped 3x3 convs
X152 = dict(blocks=(3, 8, 36, 3), groups=32, width_per_group=8)


def detectron_shapes(blocks, groups, width_per_group, classes=10):
    """Blob name -> shape of a Detectron ResNeXt (ImageNet pretrained: stem, res2..res5, `pred` classifier)."""
    shapes = {"conv1_w": (64, 3, 7, 7), "res_conv1_bn_s": (64,), "res_conv1_bn_b": (64,)}
    dim_in, dim_inner = 64, groups * width_per_group
    for stage, (count, dim_out) in enumerate(zip(blocks, (256, 512, 1024, 2048)), start=2):
        for i in range(count):
            prefix = f"res{stage}_{i}"
            convs = {"branch2a": (dim_inner, dim_in, 1, 1), "branch2b": (dim_inner, dim_inner // groups, 3, 3),
                     "branch2c": (dim_out, dim_inner, 1, 1)}
            if dim_in != dim_out:  # Detectron's add_shortcut: a projection when the width changes
                convs["branch1"] = (dim_out, dim_in, 1, 1)
            for branch, shape in convs.items():
                shapes[f"{prefix}_{branch}_w"] = shape
                shapes[f"{prefix}_{branch}_bn_s"] = shapes[f"{prefix}_{branch}_bn_b"] = (shape[0],)
            dim_in = dim_out
        dim_inner *= 2
    shapes.update({"pred_w": (classes, 2048), "pred_b": (classes,)})
    return shapes


def random_blobs(arch, seed=0):
    """Detectron's blobs with values that keep activations in range: He-scaled convs, affine scale ~1."""
    gen = np.random.default_rng(seed)
    blobs = {}
    for name, shape in detectron_shapes(**arch).items():
        if name.endswith("_w"):
            fan_in = int(np.prod(shape[1:]))
            blobs[name] = (gen.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        elif name.endswith("_s"):
            blobs[name] = gen.uniform(0.5, 1.0, shape).astype(np.float32)
        else:
            blobs[name] = gen.uniform(-0.2, 0.2, shape).astype(np.float32)
        blobs[name + "_momentum"] = np.zeros(shape, np.float32)  # SGD state: Detectron saves it too
    return blobs


def caffe2_forward(blobs, bgr, blocks, groups, stem_padding=None):
    """Detectron's ResNeXt graph on BGR 0-255 minus means (stride in the 3x3 conv, as FAIR's models).

    `stem_padding` (per channel) fills conv1's 3-pixel padding instead of zeros.
    """
    blob = {k: torch.from_numpy(v).double() for k, v in blobs.items()}

    def affine(x, prefix):
        return x * blob[prefix + "_s"].view(1, -1, 1, 1) + blob[prefix + "_b"].view(1, -1, 1, 1)

    if stem_padding is not None:
        pad = stem_padding.view(1, 3, 1, 1)
        bgr = F.pad(bgr - pad, (3, 3, 3, 3)) + pad
    x = F.conv2d(bgr, blob["conv1_w"], stride=2, padding=0 if stem_padding is not None else 3)
    x = F.max_pool2d(F.relu(affine(x, "res_conv1_bn")), kernel_size=3, stride=2, padding=1)
    for stage, count in enumerate(blocks, start=2):
        for i in range(count):
            prefix, stride = f"res{stage}_{i}", 2 if stage > 2 and i == 0 else 1
            y = F.relu(affine(F.conv2d(x, blob[prefix + "_branch2a_w"]), prefix + "_branch2a_bn"))
            y = F.conv2d(y, blob[prefix + "_branch2b_w"], stride=stride, padding=1, groups=groups)
            y = F.relu(affine(y, prefix + "_branch2b_bn"))
            y = affine(F.conv2d(y, blob[prefix + "_branch2c_w"]), prefix + "_branch2c_bn")
            if prefix + "_branch1_w" in blob:
                x = affine(F.conv2d(x, blob[prefix + "_branch1_w"], stride=stride), prefix + "_branch1_bn")
            x = F.relu(y + x)
    return x


def our_trunk(arch, **norm):
    resnet = ResNet(Bottleneck, list(arch["blocks"]), groups=arch["groups"],
                    width_per_group=arch["width_per_group"], norm_layer=norm.get("norm_layer", FrozenBatchNorm2d))
    return ResNetTrunk(resnet)


def pixels(seed=0, height=96, width=64):
    return torch.randint(0, 256, (1, 3, height, width), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def ours_input(rgb):
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (rgb.double() / 255 - mean) / std


def detectron_input(rgb):
    return rgb.flip(1).double() - DETECTRON_MEANS_BGR.view(1, 3, 1, 1)


def dump_like_detectron(blobs, path, layout):
    """Detectron's file: Python 2 pickled {"blobs": ..., "cfg": ...} under numpy 1.x's module names, with
    each array's raw data a byte string (str once read); "flat": the blobs alone as Python 3 pickles
    them with protocol 2 (numpy 2's names, raw data through _codecs.encode)."""
    if layout == "flat":
        path.write_bytes(pickle.dumps(blobs, protocol=2))
        return

    class Python2Arrays(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                rebuild = obj.__reduce__()[0]
                state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
                return rebuild, (np.ndarray, (0,), "b"), state
            return NotImplemented

    with open(path, "wb") as file:
        Python2Arrays(file, protocol=2).dump({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"})
    data = path.read_bytes()
    assert b"cnumpy._core.multiarray\n" in data and b"_codecs" not in data
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


@pytest.fixture(scope="module")
def small():
    blobs = random_blobs(SMALL)
    return blobs, convert_weights.convert(blobs, our_trunk(SMALL))


@pytest.mark.parametrize("layout", ["blobs", "flat"])
def test_both_layouts_read_back_as_written(tmp_path, layout):
    blobs = random_blobs(SMALL)
    dump_like_detectron(blobs, tmp_path / "X.pkl", layout)
    read = convert_weights.read_blobs(tmp_path / "X.pkl")
    assert read.keys() == blobs.keys()
    assert all(read[k].dtype == np.float32 and np.array_equal(read[k], v) for k, v in blobs.items())


def test_the_converted_file_makes_our_trunk_compute_the_caffe2_model(tmp_path):
    blobs = random_blobs(SMALL)
    pkl, out = tmp_path / "X-small.pkl", tmp_path / "weights" / "small.safetensors"
    dump_like_detectron(blobs, pkl, "blobs")
    left_out = convert_weights.convert_file(pkl, out, our_trunk(SMALL))
    assert left_out == sorted([n for n in blobs if n.endswith("_momentum")] + ["pred_b", "pred_w"])
    trunk = our_trunk(SMALL)
    _load_backbone_file(trunk, str(out))  # what model.backbone_weights does with the file
    trunk.double().eval()
    rgb = pixels()
    with torch.no_grad():
        ours = trunk(ours_input(rgb))
        # our zero padding of conv1's input is the ImageNet mean; in Detectron's input that pixel reads
        imagenet_grey = 255 * torch.tensor(IMAGENET_MEAN[::-1], dtype=torch.float64) - DETECTRON_MEANS_BGR
        reference = caffe2_forward(blobs, detectron_input(rgb), SMALL["blocks"], SMALL["groups"], imagenet_grey)
    assert ours.shape == reference.shape == (1, 2048, 3, 2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_the_stem_is_exact_inside_the_image_and_off_by_the_padding_grey_at_its_border(small):
    """Detectron's own zero padding (its mean grey) differs from ours (the ImageNet mean) only where
    conv1's 7x7 window leaves the image: the first two and last output rows and columns."""
    blobs, (state, _) = small
    rgb = pixels(seed=1)
    with torch.no_grad():
        ours = F.conv2d(ours_input(rgb), state["conv1.weight"].double(), stride=2, padding=3)
        ours = ours * state["bn1.weight"].double().view(1, -1, 1, 1) + state["bn1.bias"].double().view(1, -1, 1, 1)
        conv1 = F.conv2d(detectron_input(rgb), torch.from_numpy(blobs["conv1_w"]).double(), stride=2, padding=3)
        reference = (conv1 * torch.from_numpy(blobs["res_conv1_bn_s"]).double().view(1, -1, 1, 1)
                     + torch.from_numpy(blobs["res_conv1_bn_b"]).double().view(1, -1, 1, 1))
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours[..., 2:-1, 2:-1], reference[..., 2:-1, 2:-1], rtol=1e-5, atol=1e-5 * scale)
    border = (ours - reference).abs()
    assert border[..., :2, :].max() > 1e-4 * scale  # the padding grey does differ there
    assert border.max() < 0.05 * scale


def test_each_norm_scales_by_exactly_detectrons_s(small):
    """running_var = 1 - eps: the frozen norm's 1/sqrt(var + eps) is exactly 1 in float32."""
    _, (state, _) = small
    trunk = our_trunk(SMALL)
    trunk.load_state_dict(state, strict=True)
    norms = [m for m in trunk.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 1 + 3 * sum(SMALL["blocks"]) + 4
    for norm in norms:
        assert torch.equal((norm.running_var + norm.eps).rsqrt(), torch.ones_like(norm.running_var))
    # and trainable norms (model.train_backbone_norm) take the same file
    our_trunk(SMALL, norm_layer=torch.nn.BatchNorm2d).load_state_dict(state, strict=True)


def test_every_x152_blob_lands_in_our_resnext152_trunk():
    """The full X-152-32x8d name set (shapes only: zero-stride arrays, no memory) fills our X152 exactly."""
    shapes = detectron_shapes(**X152, classes=5000)
    zero = np.zeros(1, np.float32)
    blobs = {name: np.lib.stride_tricks.as_strided(zero, shape, (0,) * len(shape)) for name, shape in shapes.items()}
    blobs.update({name + "_momentum": blobs[name] for name in shapes})
    with torch.device("meta"):
        target = build_trunk(ModelConfig(backbone="resnext152_32x8d"))
    state, left_out = convert_weights.convert(blobs, target)
    assert left_out == sorted([n + "_momentum" for n in shapes] + ["pred_b", "pred_w"])
    target.load_state_dict(state, strict=True, assign=True)  # torch's own check of names and shapes


def _without(blobs, name):
    return {k: v for k, v in blobs.items() if k != name}


@pytest.mark.parametrize("damage,named", [
    (lambda b: _without(b, "res3_1_branch2b_w"), "layer2.1.conv2.weight"),
    (lambda b: {**b, "res4_0_branch2c_w": b["res4_0_branch2c_w"][:512]}, "res4_0_branch2c_w"),
    (lambda b: {**b, "res2_0_branch2a_bn_rm": b["res2_0_branch2a_bn_s"]}, "res2_0_branch2a_bn_rm"),
    (lambda b: {**b, "res5_1_branch2a_w": b["res5_0_branch2a_w"]}, "res5_1_branch2a_w"),
    (lambda b: {**b, "res5_1_branch2a_bn_s": b["res5_0_branch2a_bn_s"]}, "res5_1_branch2a_bn_s"),
    (lambda b: {**b, "conv1_w": b["conv1_w"].astype(np.int32)}, "conv1_w"),
], ids=["missing", "wrong shape", "unfused norm", "a block too many", "a norm too many", "not floats"])
def test_a_blob_that_does_not_fit_is_an_error_naming_it(small, damage, named):
    blobs, _ = small
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        convert_weights.convert(damage(blobs), our_trunk(SMALL))


class _Runs:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


# protocol 2 writes Python 3's builtins under their Python 2 module name
@pytest.mark.parametrize("call,named", [(os.system, f"{os.system.__module__}.system"), (exec, "__builtin__.exec")],
                         ids=["os.system", "exec"])
def test_a_pickle_naming_any_other_global_is_refused_before_anything_runs(tmp_path, capsys, call, named):
    marker = tmp_path / "ran"
    payload = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    blobs = {**random_blobs(dict(blocks=(1, 1, 1, 1), groups=1, width_per_group=4)), "lr": _Runs(call, payload)}
    pkl, out = tmp_path / "X-152-32x8d-IN5k.pkl", tmp_path / "out.safetensors"
    pkl.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    assert convert_weights.main([str(pkl), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(pkl) in err and f"refused the global {named}" in err
    assert not marker.exists() and not out.exists()
