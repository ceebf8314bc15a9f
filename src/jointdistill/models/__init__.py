"""Model registry: teachers and the student, built from params, never downloaded.

See `nets.MultiHeadNet` for the output interface shared by every model. Presets: the CPU default is
``backbone: tiny, head: light``; the paper's configuration is ``resnet101 + aspp`` for the teachers
(torchvision's DeepLabV3-ResNet-101) and ``resnet50 + aspp`` for the student.
"""

from __future__ import annotations

from jointdistill.models.nets import TASKS, ModelConfig, MultiHeadNet, Network

__all__ = ["TASKS", "ModelConfig", "MultiHeadNet", "Network", "build_teacher", "build_student"]


def build_teacher(
    task: str, backbone: str, head: str, num_classes: int, pretrained_backbone: str | None = None, **kw
) -> MultiHeadNet:
    """A single-task teacher: DeepLabV3-style encoder + one head (``backbone='resnet101', head='aspp'`` is
    torchvision's DeepLabV3-ResNet-101; for depth the head has one positive output channel)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    return MultiHeadNet(
        ModelConfig(backbone=backbone, head=head, tasks=(task,), num_classes=num_classes, **kw), pretrained_backbone
    )


def build_student(
    backbone: str, head: str, num_classes: int, pretrained_backbone: str | None = None, **kw
) -> MultiHeadNet:
    """The multi-task student: one shared encoder with a segmentation head and a depth head."""
    return MultiHeadNet(
        ModelConfig(backbone=backbone, head=head, tasks=TASKS, num_classes=num_classes, **kw), pretrained_backbone
    )


def build_from_config(config: ModelConfig | dict) -> MultiHeadNet:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return MultiHeadNet(config)


from jointdistill.models.flops import model_flops  # noqa: E402
from jointdistill.models.store import load_model, save_model  # noqa: E402

__all__ += ["load_model", "save_model", "build_from_config", "model_flops"]
