"""Feedback-driven adaptive teacher weights, as pure functions on plain floats.

At the end of timeframe t, on val, each task's score r (higher is better: mIoU for seg, δ<1.25 for depth, the
share of pixels within 25 % of the truth, on the relative scale of the depth loss and of Δm) is compared with its
frozen teacher's r^T (measured once, before distillation). A feedback *rule* turns the history of those scores
into a target for each weight; every rule then moves ω the same way:

    ω_i ← ω_i − β · ω_i · (ω_i − target_i)       then clip to [ω_min, ω_max] and rescale so Σ ω_i = N.

The rules (``distill.feedback_kind``), each with two directions (``distill.feedback``: ``progress`` gives more
weight to the task the student learns well, the paper's words; ``deficit`` to the lagging one):

- ``level``: a_i = r_i^S / r_i^T, target_i = ω̄ · (a_i / ā)^(±α). Measured, it saturates: the student imitates both
  teachers, both ratios go to about 1 and their spread sits at the timeframe-to-timeframe noise.
- ``rate``: the log gap g_i,t = log(r_i^T / r_i,t^S); the signal is how fast it closed over the last k timeframes,
  s_i = (g_i,t−k − g_i,t) / k.
- ``closed``: the share of the starting gap closed so far, s_i = (g_i,0 − g_i,t) / g_i,0.

For ``rate`` and ``closed`` each signal's noise σ_i is estimated from the recent timeframe-to-timeframe variation
of the gap (the SD of its last steps, around their mean). What moves ω is how far a task's signal is from the
tasks' mean, in units of that difference's noise: z_i = (s_i − s̄) / σ(s_i − s̄), so two tasks learning at the same
pace give z = 0 however fast they learn. Within ``noise_band`` SDs of zero a difference counts as noise (z shrunk
to 0 there, and by the band beyond it), and target_i = N · exp(±α z_i) / Σ_j exp(±α z_j). So ω moves on signal,
not on noise, and until the noise can be estimated (three steps of the gap) it holds.

α is the exponent that sets how strongly ω follows the feedback (GradNorm's form): α = 0 keeps ω static. (A
literal reading of the paper, target_i = ω̄ · a_i · ā^(α−1), has the fixed point ω_i = 1 + ā^(α−1)·(a_i − ā)
under Σω = N: ω can never leave 1 by more than the spread of the feedback, and α hardly matters. See
docs/method.md.)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import cast

EPS = 1e-8
FEEDBACK = ("progress", "deficit")
KINDS = ("level", "rate", "closed")
MIN_NOISE_STEPS = 3  # gap steps needed before a noise estimate is trusted
NOISE_FLOOR = 1e-3  # of the log gap per timeframe: a run whose score never moves is not infinitely certain


def task_score(task: str, metrics: dict) -> float:
    """The higher-is-better score r of a task's metrics: mIoU for seg, δ<1.25 for depth."""
    if task == "seg":
        return float(metrics["miou"])
    if task == "depth":
        return float(metrics["delta1"])
    raise ValueError(f"unknown task {task!r}")


def feedback(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """a_i = r_i^S / r_i^T for every task (a teacher score of 0 counts as EPS: no division by zero)."""
    if set(student) != set(teacher):
        raise ValueError(f"tasks differ: student {sorted(student)} vs teacher {sorted(teacher)}")
    return {t: max(student[t], 0.0) / max(teacher[t], EPS) for t in student}


def _sign(direction: str) -> float:
    if direction not in FEEDBACK:
        raise ValueError(f"unknown feedback direction {direction!r} (expected one of {FEEDBACK})")
    return 1.0 if direction == "progress" else -1.0


def targets(weights: dict[str, float], a: dict[str, float], alpha: float, direction: str = "progress") -> dict:
    """The level rule: target_i = ω̄ · (a_i / ā)^α (progress) or ω̄ · (ā / a_i)^α (deficit)."""
    sign = _sign(direction)
    mean_w = sum(weights.values()) / len(weights)
    mean_a = max(sum(a.values()) / len(a), EPS)
    return {t: mean_w * (max(a[t], EPS) / mean_a) ** (sign * alpha) for t in weights}


def z_targets(z: dict[str, float], alpha: float, direction: str = "progress", band: float = 0.0) -> dict:
    """The noise-scaled rules: target_i = N · exp(±α z̃_i) / Σ_j exp(±α z̃_j), z̃ = z shrunk by ``band`` towards 0."""
    sign = _sign(direction)
    shrunk = {t: math.copysign(max(abs(v) - band, 0.0), v) for t, v in z.items()}
    top = max(sign * alpha * v for v in shrunk.values())
    e = {t: math.exp(sign * alpha * v - top) for t, v in shrunk.items()}
    total = sum(e.values())
    return {t: len(z) * v / total for t, v in e.items()}


def step_towards(
    weights: dict[str, float], goal: dict[str, float], beta: float, w_min: float = 0.1, w_max: float = 10.0
) -> dict[str, float]:
    """ω_i − β · ω_i · (ω_i − goal_i), clipped to [w_min, w_max], rescaled so Σ ω = N."""
    if set(weights) != set(goal):
        raise ValueError(f"tasks differ: weights {sorted(weights)} vs feedback {sorted(goal)}")
    if not w_min <= w_max or w_min <= 0:
        raise ValueError(f"need 0 < w_min <= w_max, got {w_min}, {w_max}")
    n = len(weights)
    # A step of β is a gradient step on ½(ω − target)² scaled by ω; clipped so one step never flips a sign.
    new = {task: min(max(w - beta * w * (w - goal[task]), w_min), w_max) for task, w in weights.items()}
    total = sum(new.values())
    out = {t: v * n / total for t, v in new.items()}
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite teacher weights {out} from targets {goal}")
    return out


def update(
    weights: dict[str, float],
    a: dict[str, float],
    alpha: float,
    beta: float,
    w_min: float = 0.1,
    w_max: float = 10.0,
    direction: str = "progress",
) -> dict[str, float]:
    """One timeframe's update of ω by the level rule from the feedback ratios ``a``."""
    if set(weights) != set(a):
        raise ValueError(f"tasks differ: weights {sorted(weights)} vs feedback {sorted(a)}")
    return step_towards(weights, targets(weights, a, alpha, direction), beta, w_min, w_max)


@dataclass(frozen=True)
class Signal:
    """One task's feedback at one timeframe: the signal s, its noise σ (None: not yet estimable) and z = s / σ."""

    value: float
    noise: float | None = None

    @property
    def z(self) -> float:
        return self.value / self.noise if self.noise else 0.0


def log_gap(student: float, teacher: float) -> float:
    """g = log(r^T / r^S): 0 when the student matches its teacher, larger the further behind it is."""
    return math.log(max(teacher, EPS) / max(student, EPS))


def gap_noise(gaps: list[float], window: int) -> float | None:
    """The SD of the gap's last steps (over ``max(2·window, 3)`` of them) around their mean: the timeframe-to-
    timeframe jitter, with the steady trend taken out. None before MIN_NOISE_STEPS steps exist."""
    steps = [a - b for a, b in zip(gaps[:-1], gaps[1:])][-max(2 * window, MIN_NOISE_STEPS) :]
    if len(steps) < MIN_NOISE_STEPS:
        return None
    return max(statistics.stdev(steps), NOISE_FLOOR)


def relative_z(signals: dict[str, Signal]) -> dict[str, float]:
    """Each task's signal relative to the tasks' mean, in units of that difference's own noise: two tasks that learn
    equally fast (or equally noisily) get z = 0, whatever their common pace. 0 while any noise is unknown."""
    if any(s.noise is None for s in signals.values()):
        return dict.fromkeys(signals, 0.0)
    n = len(signals)
    mean = sum(s.value for s in signals.values()) / n
    var = {t: cast(float, s.noise) ** 2 for t, s in signals.items()}
    out = {}
    for t, s in signals.items():
        # Var(s_i − mean) = (1 − 1/n)² σ_i² + Σ_{j≠i} σ_j² / n²
        v = (1 - 1 / n) ** 2 * var[t] + sum(var[j] for j in signals if j != t) / n**2
        out[t] = (s.value - mean) / math.sqrt(v) if v > 0 else 0.0
    return out


class FeedbackRule:
    """A feedback rule: from each task's score history (student, every timeframe so far) and its teacher's score,
    the signal that moves ω and the target it moves towards. One subclass per ``distill.feedback_kind``."""

    kind = ""

    def __init__(self, alpha: float, direction: str, window: int = 5, band: float = 0.0):
        _sign(direction)
        self.alpha, self.direction, self.window, self.band = alpha, direction, window, band

    def signals(self, history: dict[str, list[float]], teacher: dict[str, float]) -> dict[str, Signal]:
        raise NotImplementedError

    def targets(self, weights: dict[str, float], signals: dict[str, Signal]) -> dict[str, float]:
        return z_targets(relative_z(signals), self.alpha, self.direction, self.band)


class LevelRule(FeedbackRule):
    kind = "level"

    def signals(self, history, teacher):
        a = feedback({t: h[-1] for t, h in history.items()}, teacher)
        return {t: Signal(v) for t, v in a.items()}

    def targets(self, weights, signals):
        return targets(weights, {t: s.value for t, s in signals.items()}, self.alpha, self.direction)


class RateRule(FeedbackRule):
    kind = "rate"

    def signals(self, history, teacher):
        out = {}
        for t, h in history.items():
            g = [log_gap(r, teacher[t]) for r in h]
            k = min(self.window, len(g) - 1)
            noise = gap_noise(g, self.window)
            # The mean of k steps: its noise is that of one step over √k.
            out[t] = Signal((g[-1 - k] - g[-1]) / k if k else 0.0, noise / math.sqrt(k) if noise and k else None)
        return out


class ClosedRule(FeedbackRule):
    kind = "closed"

    def signals(self, history, teacher):
        out = {}
        for t, h in history.items():
            g = [log_gap(r, teacher[t]) for r in h]
            start = max(g[0], EPS)
            noise = gap_noise(g, self.window)
            out[t] = Signal((g[0] - g[-1]) / start, noise / start if noise else None)
        return out


RULES: dict[str, type[FeedbackRule]] = {r.kind: r for r in (LevelRule, RateRule, ClosedRule)}


class TeacherWeights:
    """ω over timeframes: fixed at 1 (``adaptive=False``, the static_kd mode) or updated by a feedback rule. Every
    timeframe's scores, signals, noise and weights are kept in ``history`` (the rows of weights.csv)."""

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
        kind: str = "level",
        window: int = 5,
        band: float = 0.0,
    ):
        if kind not in RULES:
            raise ValueError(f"unknown feedback kind {kind!r} (expected one of {KINDS})")
        self.weights = dict.fromkeys(tasks, 1.0)
        self.teacher_scores = dict(teacher_scores)
        self.rule = RULES[kind](alpha, direction, window, band)
        self.beta, self.adaptive = beta, adaptive
        self.w_min, self.w_max = w_min, w_max
        self.scores: dict[str, list[float]] = {t: [] for t in tasks}
        self.history: list[dict] = []

    def step(self, timeframe: int, step: int, student_scores: dict[str, float]) -> dict[str, float]:
        """Record this timeframe's scores and feedback; return the weights for the next timeframe."""
        for t in self.weights:
            self.scores[t].append(float(student_scores[t]))
        signals = self.rule.signals(self.scores, self.teacher_scores)
        if self.adaptive:
            goal = self.rule.targets(self.weights, signals)
            self.weights = step_towards(self.weights, goal, self.beta, self.w_min, self.w_max)
        for task in self.weights:
            s = signals[task]
            self.history.append(
                {
                    "timeframe": timeframe,
                    "step": step,
                    "task": task,
                    "score": self.scores[task][-1],
                    "feedback": s.value,
                    "noise": s.noise if s.noise is not None else "",
                    "z": s.z if self.rule.kind != "level" else "",
                    "omega": self.weights[task],
                }
            )
        return dict(self.weights)

    def state_dict(self) -> dict:
        return {"weights": dict(self.weights), "history": list(self.history), "scores": dict(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.history = dict(state["weights"]), list(state["history"])
        self.scores = {t: list(v) for t, v in state.get("scores", {t: [] for t in self.weights}).items()}
