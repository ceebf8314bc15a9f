"""Task heads on the stride-8 features: torchvision's DeepLabV3 head (ASPP), or a light one for CPUs."""

from __future__ import annotations

import math

from torch import nn


def light_head(in_channels: int, out_channels: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )


def build_head(kind: str, in_channels: int, out_channels: int, hidden: int = 64) -> nn.Module:
    if kind == "aspp":
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead  # lazily: see backbones.RESNETS

        return DeepLabHead(in_channels, out_channels)  # ASPP(12, 24, 36) → 256 → out, as in torchvision
    if kind == "light":
        return light_head(in_channels, out_channels, hidden)
    raise ValueError(f"unknown head {kind!r} (expected 'aspp' or 'light')")


def init_depth_bias(head: nn.Module, typical_depth_m: float = 10.0) -> None:
    """Depth heads predict log-metres: start them at a typical depth rather than at 1 m."""
    last = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
    nn.init.zeros_(last.weight)
    assert last.bias is not None  # the heads' last convolutions have a bias
    nn.init.constant_(last.bias, math.log(typical_depth_m))
