"""The CNN trunk: torchvision's ResNet layers, run with each frozen norm folded into its conv.

    trunk = build_trunk(cfg)            # conv1, bn1, layer1..layer4: torchvision's names
    features = trunk(images, pixel_mask)  # (B, C, H/32, W/32), zero outside each image

A frozen norm is a fixed per-channel affine map, y = x * scale + shift, so conv-then-norm
equals one conv with weight * scale and bias shift. Running it that way saves an elementwise
pass over every activation forward and backward, and under bf16 autocast it avoids
FrozenBatchNorm2d's fp32 arithmetic and the dtype copies around it (half the GPU time of an
R50 step at 800x1333 in our profile). The trained conv weight stays the parameter, so the
optimizer, weight decay and state-dict names (ImageNet weights load by name) are unchanged.
Trainable norms (`model.train_backbone_norm`) run as real BatchNorm2d after their conv.

Padded images: a valid pixel's features must not depend on the padding. Only operations
that mix neighbouring pixels can leak it: convs with a kernel larger than 1x1 and the stem's
max-pool. Their inputs are zeroed outside each image (what the unpadded image's own zero
padding would read; after a ReLU, zeros never win a max), and so is the trunk's output.
Pointwise convs, norms and ReLUs cannot leak, so nothing is zeroed after them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from pixelbert_dist.config import ModelConfig


class _WidthResNet(ResNet):
    """torchvision's ResNet with chosen stage widths (its own __init__ fixes 64..512)."""

    def __init__(self, block: type[nn.Module], blocks: list[int], widths: list[int],
                 norm_layer: type[nn.Module]) -> None:
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], blocks[0])
        self.layer2 = self._make_layer(block, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], blocks[3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_resnet(cfg: ModelConfig) -> ResNet:
    """The torchvision ResNet of `cfg.backbone`, with ImageNet weights when asked."""
    norm = nn.BatchNorm2d if cfg.train_backbone_norm else FrozenBatchNorm2d
    if cfg.backbone == "resnet50":
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2 if cfg.backbone_weights == "imagenet" else None
        return torchvision.models.resnet50(weights=weights, norm_layer=norm)
    if cfg.backbone == "resnext152_32x8d":
        if cfg.backbone_weights == "imagenet":
            raise ValueError("model.backbone_weights=imagenet: torchvision has no ImageNet weights for "
                             "ResNeXt-152 32x8d; give a path to a converted state dict instead")
        return ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=8, norm_layer=norm)
    block = BasicBlock if cfg.backbone_block == "basic" else Bottleneck
    return _WidthResNet(block, cfg.backbone_blocks, cfg.backbone_widths, norm)


def build_trunk(cfg: ModelConfig) -> "ResNetTrunk":
    """The stem and four stages of `cfg.backbone`, weights loaded as `cfg.backbone_weights` says."""
    trunk = ResNetTrunk(build_resnet(cfg))
    if cfg.backbone_weights not in ("none", "imagenet"):
        _load_backbone_file(trunk, cfg.backbone_weights)
    return trunk


def _load_backbone_file(trunk: nn.Module, path: str) -> None:
    """Load a torchvision-named ResNet state dict (.safetensors, or .pt read with weights_only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"model.backbone_weights={path} does not fit model.backbone: {err}") from None


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool = True) -> Tensor:
    """norm(conv(x)); a frozen norm is applied inside the conv (one kernel) when `fold`."""
    if not (fold and isinstance(norm, FrozenBatchNorm2d)):
        return norm(conv(x))
    # The scale and shift in at least fp32 from the stored statistics, then in the weight's dtype:
    # under autocast the conv casts both to bf16 with its input, so no fp32 activation is made.
    dtype = conv.weight.dtype
    exact = torch.promote_types(dtype, torch.float32)
    scale = norm.weight.to(exact) * (norm.running_var.to(exact) + norm.eps).rsqrt()
    shift = norm.bias.to(exact) - norm.running_mean.to(exact) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(exact) * scale
    weight = (conv.weight.to(exact) * scale.view(-1, 1, 1, 1)).to(dtype)
    if x.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)  # ZeRO stores weights flat (NCHW)
    return conv._conv_forward(x, weight, shift.to(dtype))


class _PaddingMask:
    """The pixel mask at each feature-map size, in the activations' dtype, made once per forward."""

    def __init__(self, pixel_mask: Tensor | None) -> None:
        self.pixel_mask = pixel_mask
        self._at: dict[tuple[int, int], Tensor] = {}

    def zero(self, x: Tensor) -> Tensor:
        """x with every position outside its image set to 0 (x itself when nothing is padded)."""
        if self.pixel_mask is None:
            return x
        height, width = x.shape[-2:]
        if (height, width) not in self._at:
            # A stride-s layer with "same" padding yields ceil(h / s) outputs for h input rows:
            # exactly the rows where mask[::s] is True, so striding the pixel mask gives each level's.
            stride = self.pixel_mask.shape[-2] // height
            level = self.pixel_mask[:, ::stride, ::stride][:, :height, :width]
            self._at[(height, width)] = level.unsqueeze(1).to(x.dtype)
        return x * self._at[(height, width)]


class ResNetTrunk(nn.Module):
    """Stem + four stages of a torchvision ResNet under torchvision's parameter names, no head.

    `fold_norms` (default on) applies frozen norms inside their convs; off, the trunk computes
    the same function layer by layer, as torchvision does (the benchmarks' baseline).
    `checkpoint_stages` recomputes each stage's activations in backward instead of storing them;
    `channels_last` runs the convs on NHWC activations (set on a GPU by the trainer).
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = resnet.conv1, resnet.bn1, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.fold_norms = True
        self.checkpoint_stages = False
        self.channels_last = False  # NHWC activations: what cuDNN's fastest conv kernels read

    @property
    def out_channels(self) -> int:
        last = self.layer4[-1]
        return (last.conv3 if isinstance(last, Bottleneck) else last.conv2).out_channels

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) normalized images -> stage-4 features, zero outside each image's valid region.

        `pixel_mask` (B, H, W) is True on real pixels; None means no image is padded.
        """
        mask = _PaddingMask(pixel_mask)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = F.relu(conv_norm(self.conv1, self.bn1, images, self.fold_norms), inplace=True)
        x = self.maxpool(mask.zero(x))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.checkpoint_stages and torch.is_grad_enabled():
                x = checkpoint(self._stage, stage, x, mask, use_reentrant=False)
            else:
                x = self._stage(stage, x, mask)
        return mask.zero(x)

    def _stage(self, stage: nn.Sequential, x: Tensor, mask: _PaddingMask) -> Tensor:
        for block in stage:
            x = self._bottleneck(block, x, mask) if isinstance(block, Bottleneck) else self._basic(block, x, mask)
        return x

    def _bottleneck(self, block: Bottleneck, x: Tensor, mask: _PaddingMask) -> Tensor:
        fold = self.fold_norms
        out = F.relu(conv_norm(block.conv1, block.bn1, x, fold), inplace=True)
        out = F.relu(conv_norm(block.conv2, block.bn2, mask.zero(out), fold), inplace=True)  # 3x3
        out = conv_norm(block.conv3, block.bn3, out, fold)
        shortcut = x if block.downsample is None else conv_norm(*block.downsample, x, fold)  # 1x1
        return F.relu(out + shortcut, inplace=True)

    def _basic(self, block: BasicBlock, x: Tensor, mask: _PaddingMask) -> Tensor:
        fold = self.fold_norms
        x = mask.zero(x)  # both convs are 3x3
        out = F.relu(conv_norm(block.conv1, block.bn1, x, fold), inplace=True)
        out = conv_norm(block.conv2, block.bn2, mask.zero(out), fold)
        shortcut = x if block.downsample is None else conv_norm(*block.downsample, x, fold)
        return F.relu(out + shortcut, inplace=True)
