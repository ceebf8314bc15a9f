"""Feedback-driven adaptive teacher weights, as pure functions on plain floats.

At the end of timeframe t, on val, each task's feedback is the student's score relative to its frozen
teacher's (measured once, before distillation), with r a higher-is-better score (mIoU; 1 / AbsErr):

    a_i = r_i^S / r_i^T,     ā = mean_i a_i,
    target_i = ω̄ · (a_i / ā)^α      (feedback "progress": more to the task the student learns well)
    target_i = ω̄ · (ā / a_i)^α      (feedback "deficit": more to the lagging task)
    ω_i ← ω_i − β · ω_i · (ω_i − target_i)       then clip to [ω_min, ω_max] and rescale so Σ ω_i = N.

α is the exponent that sets how strongly ω follows the feedback (GradNorm's form): α = 0 keeps ω static, and
for α > 0 the fixed point moves away from equal weights as the feedback spreads. (A literal reading of the
paper, target_i = ω̄ · a_i · ā^(α−1), has the fixed point ω_i = 1 + ā^(α−1)·(a_i − ā) under Σω = N: ω can never
leave 1 by more than the spread of the feedback, and α hardly matters. See docs/method.md.)
"""

from __future__ import annotations

import math

EPS = 1e-8


def task_score(task: str, metrics: dict) -> float:
    """The higher-is-better score r of a task's metrics: mIoU for seg, 1 / AbsErr for depth."""
    if task == "seg":
        return float(metrics["miou"])
    if task == "depth":
        return 1.0 / max(float(metrics["abs_err"]), EPS)
    raise ValueError(f"unknown task {task!r}")


def feedback(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """a_i = r_i^S / r_i^T for every task (a teacher score of 0 counts as EPS: no division by zero)."""
    if set(student) != set(teacher):
        raise ValueError(f"tasks differ: student {sorted(student)} vs teacher {sorted(teacher)}")
    return {t: max(student[t], 0.0) / max(teacher[t], EPS) for t in student}


FEEDBACK = ("progress", "deficit")


def targets(weights: dict[str, float], a: dict[str, float], alpha: float, direction: str = "progress") -> dict:
    """target_i = ω̄ · (a_i / ā)^α (progress) or ω̄ · (ā / a_i)^α (deficit)."""
    if direction not in FEEDBACK:
        raise ValueError(f"unknown feedback direction {direction!r} (expected one of {FEEDBACK})")
    mean_w = sum(weights.values()) / len(weights)
    mean_a = max(sum(a.values()) / len(a), EPS)
    sign = 1.0 if direction == "progress" else -1.0
    return {t: mean_w * (max(a[t], EPS) / mean_a) ** (sign * alpha) for t in weights}


def update(
    weights: dict[str, float],
    a: dict[str, float],
    alpha: float,
    beta: float,
    w_min: float = 0.1,
    w_max: float = 10.0,
    direction: str = "progress",
) -> dict[str, float]:
    """One timeframe's update of the teacher weights ω from the feedback scores ``a``."""
    if set(weights) != set(a):
        raise ValueError(f"tasks differ: weights {sorted(weights)} vs feedback {sorted(a)}")
    if not w_min <= w_max or w_min <= 0:
        raise ValueError(f"need 0 < w_min <= w_max, got {w_min}, {w_max}")
    n = len(weights)
    goal = targets(weights, a, alpha, direction)
    # A step of β is a gradient step on ½(ω − target)² scaled by ω; clipped so one step never flips a sign.
    new = {task: min(max(w - beta * w * (w - goal[task]), w_min), w_max) for task, w in weights.items()}
    total = sum(new.values())
    out = {t: v * n / total for t, v in new.items()}
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite teacher weights {out} from feedback {a}")
    return out


class TeacherWeights:
    """ω over timeframes: fixed at 1 (``adaptive=False``, the static_kd mode) or updated from feedback."""

    def __init__(
        self,
        tasks,
        teacher_scores: dict[str, float],
        alpha: float,
        beta: float,
        adaptive: bool = True,
        w_min: float = 0.1,
        w_max: float = 10.0,
        direction: str = "progress",
    ):
        self.weights = dict.fromkeys(tasks, 1.0)
        self.teacher_scores = dict(teacher_scores)
        self.alpha, self.beta, self.adaptive, self.direction = alpha, beta, adaptive, direction
        self.w_min, self.w_max = w_min, w_max
        self.history: list[dict] = []

    def step(self, timeframe: int, step: int, student_scores: dict[str, float]) -> dict[str, float]:
        """Record this timeframe's feedback and weights; return the weights for the next timeframe."""
        a = feedback(student_scores, self.teacher_scores)
        if self.adaptive:
            self.weights = update(self.weights, a, self.alpha, self.beta, self.w_min, self.w_max, self.direction)
        for task in self.weights:
            self.history.append(
                {"timeframe": timeframe, "step": step, "task": task, "feedback": a[task], "omega": self.weights[task]}
            )
        return dict(self.weights)

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.history = dict(state["weights"]), list(state["history"])
