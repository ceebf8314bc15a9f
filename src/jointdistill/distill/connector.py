"""The connector: fuses the frozen teachers' feature maps into one map g^F and predicts every
task from it; its outputs, weighted by ω, are the student's soft targets. Discarded after training."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

_LOG_DEPTH_RANGE = (-5.0, 6.5)


class Connector(nn.Module):
    """resize teacher features to the first one's grid → concat → (Conv3×3-BN-ReLU) ×2 → g^F → task heads.

    Channel counts come from the teachers (``feature_channels``), so any teacher pair of the registry fits.
    """

    def __init__(
        self,
        teacher_channels: list[int],
        num_classes: int,
        hidden: int = 128,
        tasks: tuple[str, ...] = ("seg", "depth"),
    ):
        super().__init__()
        self.tasks = tasks
        self.fuse = nn.Sequential(
            nn.Conv2d(sum(teacher_channels), hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(hidden, num_classes if t == "seg" else 1, 1) for t in tasks})
        if "depth" in self.heads:
            depth = cast(nn.Conv2d, self.heads["depth"])
            nn.init.zeros_(depth.weight)
            nn.init.constant_(cast(torch.Tensor, depth.bias), math.log(10.0))
        self.out_channels = hidden

    def fused(self, teacher_features: list[torch.Tensor]) -> torch.Tensor:
        """g^F alone (what the knowledge trajectory reads)."""
        grid = teacher_features[0].shape[-2:]
        feats = [
            f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            for f in teacher_features
        ]
        return self.fuse(torch.cat(feats, 1))

    def forward(self, teacher_features: list[torch.Tensor], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        fused = self.fused(teacher_features)
        out = {"features": fused}
        for task, head in self.heads.items():
            y = F.interpolate(head(fused), size=image_size, mode="bilinear", align_corners=False)
            out[task] = torch.exp(y.clamp(*_LOG_DEPTH_RANGE)) if task == "depth" else y
        return out
