"""Losses and exact split-level metrics.

Metrics are accumulated as sums over a whole split (a confusion matrix, error sums and pixel counts) and
only divided at the end, so they do not depend on the batch size and add up exactly across DDP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- losses
def seg_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over labelled pixels (0 when a batch has none, so a step never produces NaN)."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def depth_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1", silog_lambda: float = 0.85) -> torch.Tensor:
    """On valid pixels (target > 0): L1 in metres, L1 of log depth (``kind="log_l1"``: a relative error, so a
    far pixel weighs as much as a near one and the loss's scale is that of a cross-entropy, not of metres), or
    the scale-invariant log loss of Eigen et al. (``kind="silog"``)."""
    valid = target > 0
    if not valid.any():
        return pred.sum() * 0.0
    p, g = pred[valid], target[valid]
    if kind == "l1":
        return (p - g).abs().mean()
    if kind == "log_l1":
        return (torch.log(p.clamp_min(1e-6)) - torch.log(g)).abs().mean()
    if kind == "silog":
        d = torch.log(p.clamp_min(1e-6)) - torch.log(g)
        return torch.sqrt((d**2).mean() - silog_lambda * d.mean() ** 2 + 1e-12)
    raise ValueError(f"unknown depth loss {kind!r} (expected 'l1', 'log_l1' or 'silog')")


# ----------------------------------------------------------------------------- metrics
def class_ids(logits: torch.Tensor) -> torch.Tensor:
    """Class ids (N,H,W) of logits (N,C,H,W): the index of the first largest value, like ``argmax(1)``.
    ``max(1).indices`` gives the same ids (its ties also go to the first index) but reduces over the strided
    class axis about 12x faster on CPU (8 ms instead of 100 ms for 16x7x128x256 with torch 2.14), and the
    training meters call it on every step."""
    return logits.max(1).indices


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class ConfusionMatrix:
    """Rows: ground truth, columns: prediction; ignored pixels are left out."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``: class ids (N,H,W) or logits (N,C,H,W); ``target``: (N,H,W)."""
        if pred.dim() == target.dim() + 1:
            pred = class_ids(pred)
        pred, target = pred.reshape(-1).cpu(), target.reshape(-1).cpu()
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target holds class ids outside 0..{self.num_classes - 1}")
        n = self.num_classes
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def reduce(self) -> ConfusionMatrix:
        _all_reduce(self.mat)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict:
        iou = self.iou()
        present = ~iou.isnan()
        total = self.mat.sum().item()
        return {
            "miou": iou[present].mean().item() if present.any() else 0.0,
            "pixacc": self.mat.diag().sum().item() / total if total else 0.0,
            "per_class_iou": [None if v != v else float(v) for v in iou.tolist()],
        }


class DepthMeter:
    """AbsErr, RelErr and δ<1.25 over all valid pixels (gt > 0) of a split."""

    def __init__(self):
        # abs sum, rel sum, δ<1.25 count, valid count (float64: exact enough for millions of pixels)
        self.sums = torch.zeros(4, dtype=torch.float64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach().reshape(-1).cpu().double(), target.reshape(-1).cpu().double()
        valid = target > 0
        p, g = pred[valid], target[valid]
        err = (p - g).abs()
        ratio = torch.maximum(p / g, g / p.clamp_min(1e-12))
        self.sums += torch.stack(
            [
                err.sum(),
                (err / g).sum(),
                (ratio < 1.25).sum().double(),
                torch.tensor(float(g.numel()), dtype=torch.float64),
            ]
        )

    def reduce(self) -> DepthMeter:
        _all_reduce(self.sums)
        return self

    def compute(self) -> dict:
        a, r, d, n = self.sums.tolist()
        if n == 0:
            return {"abs_err": float("nan"), "rel_err": float("nan"), "delta1": float("nan")}
        return {"abs_err": a / n, "rel_err": r / n, "delta1": d / n}


# Which way is better, for model selection and Δm.
HIGHER_IS_BETTER = {"miou": True, "pixacc": True, "abs_err": False, "rel_err": False, "delta1": True}
