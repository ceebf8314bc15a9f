"""Distillation losses D_i: KL with temperature for segmentation; for depth, the depth task's own loss against
the soft target (L1 in metres, or L1 of log depth)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jointdistill.evaluation.metrics import IGNORE_INDEX


def kd_seg(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    label: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """τ² · KL(softmax(p/τ) ‖ softmax(z/τ)) per pixel, averaged over pixels whose label is not ignored.

    ``target_logits`` p are the soft targets (detached here: no gradient reaches whoever produced them).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(target_logits.detach().float() / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)  # (N, H, W)
    if label is not None:
        keep = label != ignore_index
        if not keep.any():
            return kl.sum() * 0.0
        kl = kl[keep]
    return kl.mean() * t * t


def kd_depth(
    student_depth: torch.Tensor, target_depth: torch.Tensor, gt: torch.Tensor | None = None, kind: str = "l1"
) -> torch.Tensor:
    """L1 between the student's and the target's depth, in metres (``kind="l1"``) or of log depth (any other
    depth loss: the same scale as the depth task's loss), on pixels with valid ground truth.

    Our choice: KL does not apply to a regression, and outside valid ground truth the target is an
    extrapolation it was never trained on.
    """
    s, t = student_depth.float(), target_depth.detach().float()
    if kind != "l1":
        s, t = torch.log(s.clamp_min(1e-6)), torch.log(t.clamp_min(1e-6))
    diff = (s - t).abs()
    if gt is not None:
        valid = gt > 0
        if not valid.any():
            return diff.sum() * 0.0
        diff = diff[valid]
    return diff.mean()
