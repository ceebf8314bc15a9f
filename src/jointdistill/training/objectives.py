"""What the engine optimises: an *objective*. `Objective` declares the whole contract, the required parts (loss,
metrics, the number that picks the best weights) and the optional hooks with no-op defaults; the engine calls
every hook unconditionally. `SegObjective` and `DepthObjective` train the teachers; the student's objective is
`distill.objective.StudentObjective`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter, depth_loss, seg_loss


class Objective:
    """The engine's contract with what it trains. Subclasses define the four required methods and ``monitor``;
    the hooks below them do nothing unless overridden."""

    monitor: ClassVar[str]  # the validation metric that selects the best weights
    higher_is_better: ClassVar[bool]
    # What else the model's forward takes from the batch, by key (e.g. the student's cached teacher maps).
    model_inputs: tuple[str, ...] = ()
    # Keep the last weights instead of the best validated ones (a run that trains on its val frames).
    keep_last: bool = False

    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total and its named parts, 0-d tensors (the engine reads them all at once, once per step)."""
        raise NotImplementedError

    def new_meters(self) -> dict[str, Any]:
        raise NotImplementedError

    def update(self, meters: dict[str, Any], outputs: dict, batch: dict) -> None:
        raise NotImplementedError

    def compute(self, meters: dict[str, Any]) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks (no-op defaults)
    def end_timeframe(self, timeframe: int, step: int, val: dict, model: nn.Module) -> dict:
        """Runs after each validation (a timeframe); the scalars it returns join that validation's log row."""
        return {}

    def progress(self, parts: dict[str, float]) -> dict[str, str]:
        """Extra progress-bar fields, from the last step's loss parts."""
        return {}

    def state_dict(self) -> dict:
        """The objective's own resumable state, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved."""


class SegObjective(Objective):
    monitor, higher_is_better = "miou", True

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def loss(self, outputs, batch):
        loss = seg_loss(outputs["seg"], batch["label"], self.ignore_index)
        return loss, {"seg_ce": loss.detach()}

    def new_meters(self):
        return {"seg": ConfusionMatrix(self.num_classes, self.ignore_index)}

    def update(self, meters, outputs, batch):
        meters["seg"].update(outputs["seg"], batch["label"])

    def compute(self, meters):
        return meters["seg"].compute()


class DepthObjective(Objective):
    monitor, higher_is_better = "abs_err", False

    def __init__(self, kind: str = "l1"):
        self.kind = kind

    def loss(self, outputs, batch):
        loss = depth_loss(outputs["depth"], batch["depth"], self.kind)
        return loss, {f"depth_{self.kind}": loss.detach()}

    def new_meters(self):
        return {"depth": DepthMeter()}

    def update(self, meters, outputs, batch):
        meters["depth"].update(outputs["depth"], batch["depth"])

    def compute(self, meters):
        return meters["depth"].compute()


def make_objective(task: str, num_classes: int, ignore_index: int = 255, depth_loss_kind: str = "l1") -> Objective:
    """The teacher objective of ``task`` (seg or depth)."""
    if task == "seg":
        return SegObjective(num_classes, ignore_index)
    if task == "depth":
        return DepthObjective(depth_loss_kind)
    raise ValueError(f"unknown task {task!r} (expected 'seg' or 'depth')")
