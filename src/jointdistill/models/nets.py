"""One network class for teachers and the student: a shared encoder and one head per task.

Interface (all models): ``model(images) -> dict`` with
- ``"features"``: the encoder output at stride 8, (N, C_f, H/8, W/8): the map the connector fuses and the
  knowledge trajectory reads. ``model.feature_channels`` gives C_f, ``model.feature_stride`` 8.
- ``"seg"``: class logits (N, num_classes, H, W), for models with the seg task;
- ``"depth"``: metres, strictly positive, (N, 1, H, W), for models with the depth task.
Outputs are upsampled bilinearly to the input size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from jointdistill.models.backbones import build_backbone
from jointdistill.models.heads import build_head, init_depth_bias

TASKS = ("seg", "depth")
_LOG_DEPTH_RANGE = (-5.0, 6.5)  # 7 mm .. 665 m: keeps exp() finite early in training


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every model.pt next to its weights."""

    backbone: str = "tiny"
    head: str = "light"
    tasks: tuple[str, ...] = ("seg",)
    num_classes: int = 7
    head_channels: int = 64
    tiny_widths: tuple[int, int, int, int] = (24, 48, 96, 128)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["tiny_widths"] = list(self.tasks), list(self.tiny_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["tasks"], d["tiny_widths"] = tuple(d["tasks"]), tuple(d["tiny_widths"])
        return cls(**d)


class Network(nn.Module):
    """What the training engine asks of any network it trains, with the defaults: compile the whole module, clip
    all its gradients as one group. A network made of parts with their own objectives overrides them."""

    def compile_targets(self) -> list[nn.Module]:
        """The modules `training.devices.compile_networks` compiles (where the FLOPs are)."""
        return [self]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately (see `training.engine.clip_gradients`)."""
        return [list(self.parameters())]


class MultiHeadNet(Network):
    """An encoder with one dense-prediction head per task: a teacher has one head, the student both."""

    feature_stride = 8

    def __init__(self, config: ModelConfig, pretrained_backbone: str | None = None):
        super().__init__()
        unknown = set(config.tasks) - set(TASKS)
        if unknown or not config.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {config.tasks}")
        self.config = config
        self.backbone, self.feature_channels = build_backbone(config.backbone, pretrained_backbone, config.tiny_widths)
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            out = config.num_classes if task == "seg" else 1
            self.heads[task] = build_head(config.head, self.feature_channels, out, config.head_channels)
        if "depth" in self.heads:
            init_depth_bias(self.heads["depth"])

    def compile_targets(self) -> list[nn.Module]:
        """The encoder and each head (where the FLOPs are)."""
        return [self.backbone, *self.heads.values()]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-8 feature map alone (what the knowledge trajectory reads), without the heads."""
        return self.backbone(x)["out"]

    def predict(self, feats: torch.Tensor, size) -> dict[str, torch.Tensor]:
        """The heads' outputs at ``size`` from stride-8 features (what `forward` does after the encoder)."""
        out = {}
        for task, head in self.heads.items():
            y = F.interpolate(head(feats), size=size, mode="bilinear", align_corners=False)
            if task == "depth":
                y = torch.exp(y.clamp(*_LOG_DEPTH_RANGE))
            out[task] = y
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encode(x)
        return {"features": feats, **self.predict(feats, x.shape[-2:])}
