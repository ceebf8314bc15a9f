"""What differs between training a segmentation model, a depth model and (later) the student: the loss,
the metrics, and the number that picks the best epoch."""

from __future__ import annotations

from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter, depth_loss, seg_loss


class SegObjective:
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


class DepthObjective:
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


def make_objective(task: str, num_classes: int, ignore_index: int = 255, depth_loss_kind: str = "l1"):
    if task == "seg":
        return SegObjective(num_classes, ignore_index)
    if task == "depth":
        return DepthObjective(depth_loss_kind)
    raise ValueError(f"unknown task {task!r} (expected 'seg' or 'depth')")
