"""Encoders that end at output stride 8 (the feature map the connector and trajectory read).

- ``resnet50`` / ``resnet101``: torchvision ResNets with layer3/layer4 dilated instead of strided, exactly
  as in torchvision's DeepLabV3 (the paper's teacher is DeepLabV3-ResNet-101, its student ResNet-50).
- ``resnet18`` / ``resnet34``: the same for basic blocks (dilation set on the convolutions after
  construction, since torchvision's BasicBlock does not take it).
- ``tiny``: a small residual encoder for CPUs, the default preset.

Pretrained weights are never downloaded: ``pretrained`` is an optional local file holding the torchvision
ResNet's state dict (``fc.*`` keys are ignored), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from jointdistill.errors import ModelError
from jointdistill.models.serialization import check_fit, load_safe

# torchvision is imported only when a ResNet is built: importing it loads every torchvision model and op, and
# with them torch._dynamo, about 7 s of every process's start-up that the tiny preset never needs.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = ("tiny", *RESNETS)


class _Block(nn.Module):
    """Residual block with a dilation option (two 3×3 convolutions)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        pad = dilation
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, pad, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, pad, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.skip(x))


class TinyEncoder(nn.Module):
    """stem (s2) → stage1 (s4) → stage2 (s8) → stage3 (s8, dilation 2); returns {"out": stride-8 map}."""

    def __init__(self, widths: tuple[int, int, int, int] = (24, 48, 96, 128)):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.stage1 = _Block(w0, w1, stride=2)
        self.stage2 = _Block(w1, w2, stride=2)
        self.stage3 = nn.Sequential(_Block(w2, w3, dilation=2), _Block(w3, w3, dilation=2))
        self.out_channels = w3

    def forward(self, x):
        return {"out": self.stage3(self.stage2(self.stage1(self.stem(x))))}


def _dilate_basic_resnet(net: nn.Module) -> None:
    """Turn layer3/layer4 of a BasicBlock ResNet from stride 2 into dilation 2 and 4 (output stride 8)."""
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for i, block in enumerate(cast(Any, layer)):  # torchvision's BasicBlocks
            if i == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
            for conv in (block.conv1, block.conv2):
                d = dilation // 2 if (i == 0 and conv is block.conv1) else dilation
                conv.dilation, conv.padding = (d, d), (d, d)


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a local torchvision-format state dict; a wrong or partial one is an error listing the keys."""
    state = load_safe(path, "pretrained backbone")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"pretrained backbone {path}: expected a state dict of tensors")
    # The classifier (fc) is not part of the encoder: it may be present or not.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    check_fit(own, state, f"pretrained backbone {path} does not fit {type(net).__name__}")
    net.load_state_dict(state, strict=False)  # every non-fc key was checked above


def build_backbone(name: str, pretrained: str | None = None, tiny_widths=(24, 48, 96, 128)) -> tuple[nn.Module, int]:
    """Return (module mapping an image batch to {"out": features at stride 8}, feature channels)."""
    if name == "tiny":
        enc = TinyEncoder(tuple(tiny_widths))
        if pretrained:
            load_backbone_weights(enc, pretrained)
        return enc, enc.out_channels
    if name not in RESNETS:
        raise ModelError(f"unknown backbone {name!r} (expected one of {', '.join(BACKBONES)})")
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter

    if name in ("resnet50", "resnet101"):
        net = getattr(resnet, name)(weights=None, replace_stride_with_dilation=[False, True, True])
    else:
        net = getattr(resnet, name)(weights=None)
        _dilate_basic_resnet(net)
    if pretrained:
        load_backbone_weights(net, pretrained)
    channels = net.fc.in_features
    return IntermediateLayerGetter(net, return_layers={"layer4": "out"}), channels
