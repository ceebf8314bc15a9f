"""Which ``distill`` keys shape the student under a plan, so that a sweep or a tuning run over a key its mode
never reads is refused before it trains the same student at every value.

Kept apart from the plan on purpose: the stages never import this module (a sweep is not a stage), so its edits
do not change their code digests. The keys are grouped by the part of the plan that reads them; a key outside
every group (the optimiser, the task losses, timeframes, the raw-frame batch) shapes every mode's student.
"""

from __future__ import annotations

from collections.abc import Iterable

from jointdistill.config import Params
from jointdistill.distill.plan import DistillPlan
from jointdistill.errors import ConfigError

# Read by the KD term, in any mode that has one (its soft targets from the teachers, the connector or itself).
KD = frozenset({"temperature", "lambda_kd", "kd_depth_pixels"})
# Read only where the teachers run: where their targets come from, and whether they are cached first.
TEACHERS = frozenset({"kd_target", "teacher_cache"})
# Read by the adaptive weights ω (adaptive, full).
ADAPTIVE = frozenset(
    {"alpha", "beta", "feedback", "feedback_kind", "feedback_window", "noise_band", "weight_min", "weight_max"}
)
# Read by the connector, which exists only where the trajectory or the soft targets need it.
CONNECTOR = frozenset({"connector_channels", "connector_warmup"})
# Read by the knowledge-trajectory loss (full).
TRAJECTORY = frozenset({"lambda_traj", "traj_share", "top_k", "trajectory_length", "traj_every", "traj_batch"})


def unread(plan: DistillPlan) -> frozenset[str]:
    """The ``distill`` keys (without the section) that the student of ``plan`` does not depend on."""
    groups = (
        (KD, plan.kd_source is not None),
        (TEACHERS, plan.teachers),
        (ADAPTIVE, plan.adaptive),
        (CONNECTOR, plan.connector),
        (TRAJECTORY, plan.trajectory),
    )
    return frozenset().union(*(keys for keys, used in groups if not used))


def refuse_unread(points: Iterable[Params], keys: Iterable[str], what: str) -> None:
    """One ConfigError naming the varied ``keys`` that no point's plan reads: every value would give the same
    student. ``points`` are the params each run will train with."""
    plans = [DistillPlan.from_params(p.distill) for p in points]
    dead = [k for k in keys if k.startswith("distill.") and all(k.split(".", 1)[1] in unread(p) for p in plans)]
    if dead:
        modes = sorted({p.mode for p in plans})
        raise ConfigError(
            f"{what}: {', '.join(dead)} {'is' if len(dead) == 1 else 'are'} not read in distill.mode "
            f"{'/'.join(modes)}, so every value would train the same student; set the mode whose part reads it, "
            "e.g. --set distill.mode=full"
        )
