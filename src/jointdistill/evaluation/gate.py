"""The capacity gate: a benchmark can show distillation only where the teachers beat plain multi-task training
(mtl) by a margin. `evaluate` applies it to one run, `jointdistill ablate` to every seed."""

from __future__ import annotations

GATE_MIOU_POINTS, GATE_ABS_ERR = 0.05, 0.05  # ≥ 5 mIoU points and ≥ 5 % AbsErr


def capacity_gate(teachers: dict, mtl: dict) -> dict:
    """Do the teachers beat plain multi-task training by ≥ 5 mIoU points and ≥ 5 % AbsErr? A benchmark where they
    do not cannot show distillation (the same rule as `jointdistill ablate`'s gate, here for one seed)."""
    miou_gap = teachers["miou"] - mtl["miou"]
    abs_gap = (mtl["abs_err"] - teachers["abs_err"]) / mtl["abs_err"]
    return {
        "miou_points": 100 * miou_gap,
        "abs_err_percent": 100 * abs_gap,
        "passed": bool(miou_gap >= GATE_MIOU_POINTS and abs_gap >= GATE_ABS_ERR),
    }


def gate_failure(unlabelled: int) -> str:
    """What a failed gate means: nothing to distil, unless the KD students also learn from unlabelled frames."""
    if unlabelled:
        return (
            f"; it does not bound distillation here, because the KD modes also learn from {unlabelled} "
            "frames missing a task's label, where mtl has no target for that task"
        )
    return ": this benchmark cannot show distillation"
