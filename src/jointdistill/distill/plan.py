"""How the student is distilled, decided once: the plan.

``distill.mode`` and ``distill.kd_target`` are read here and nowhere else. Every other module (the builder, the
model, the objective, the ablation, the Kubeflow adapters) asks the plan a yes/no question: do the teachers run,
does the connector exist and what reads it, where do the soft targets come from, what must the teacher cache
hold, does ω adapt, does the trajectory train the student, how many raw frames join each step. A new switch is
one field here and one line in `DistillPlan.from_params`.

The modes, one mechanism at a time:

==========  ========  ====================  =========  ==========
mode        teachers  KD term               ω adapts   trajectory
==========  ========  ====================  =========  ==========
mtl         no        no                    no         no
self_train  no        yes: its own targets  no         no
static_kd   yes       yes (ω = 1)           no         no
adaptive    yes       yes                   yes        no
full        yes       yes                   yes        yes (JointDistill)
==========  ========  ====================  =========  ==========

``self_train`` is a control, not a method: its soft targets are the student's own predictions, from a frozen copy
taken at the end of every timeframe. It sees the same frames as static_kd; whatever static_kd gains over it is
what the teachers' knowledge adds, beyond the raw frames themselves.

The connector has a role only where its outputs are the soft targets (``kd_target: connector``) or where the
trajectory reads its fused map (``full``). Otherwise it is left out, with its training, warm-up and scoring, and a
KD step costs about what an mtl step does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jointdistill.config import DistillParams
from jointdistill.data.contract import UNLABELLED, split_count
from jointdistill.errors import ConfigError

MTL = "mtl"  # labels alone: the baseline every KD mode must beat
SELF_TRAIN = "self_train"  # the student's own earlier predictions as targets: the control for the teachers
MODES = (MTL, SELF_TRAIN, "static_kd", "adaptive", "full")
KdSource = Literal["teachers", "connector", "self"]


@dataclass(frozen=True)
class DistillPlan:
    mode: str
    teachers: bool  # the two teachers load and supervise (every mode but mtl)
    kd_source: KdSource | None  # where the soft targets come from (None: no KD term)
    connector: bool  # the connector exists (trained on labels, warmed up, scored every timeframe)
    connector_targets: bool  # its outputs are the soft targets; otherwise only the trajectory reads it
    adaptive: bool  # ω follows the feedback (else it stays 1)
    trajectory: bool  # the trajectory loss trains the student (its alignment is logged in every mode)
    cache: bool  # the teachers run once into the teacher cache, and training reads from it
    cache_features: bool  # training reads the cached feature maps (the connector fuses them)
    cache_predictions: bool  # training reads the cached predictions (the teachers' own soft targets)
    pool_batch: int  # frames missing a task's label that each step adds to its fully labelled ones (0: none)
    probe_split: str = "train"  # the split the trajectory's probe images come from (its frames without labels)

    @classmethod
    def from_params(cls, cfg: DistillParams, meta: Mapping[str, Any] | None = None) -> DistillPlan:
        """The plan of ``cfg``; with the prepared data's ``meta``, also how many frames missing a label each step
        adds (the KD modes learn from every such frame; mtl only from the labels they have) and where the probes
        come from."""
        teachers = uses_teachers(cfg.mode)
        trajectory = cfg.mode == "full"
        kd_source: KdSource | None = cfg.kd_target if teachers else ("self" if cfg.mode == SELF_TRAIN else None)
        connector = teachers and (kd_source == "connector" or trajectory)
        cache = teachers and cfg.teacher_cache
        if not cfg.hold_out_val and teachers and cfg.mode in ("adaptive", "full"):
            raise ConfigError(
                f"distill.hold_out_val=false trains on val, so mode {cfg.mode}'s feedback would read its own "
                "training frames; use it with mtl, self_train or static_kd"
            )
        pool, pool_labelled = _pool(meta)
        uses_pool = bool(pool) and (kd_source is not None or pool_labelled)
        probe_split = (
            UNLABELLED if meta is not None and split_count(dict(meta), UNLABELLED) >= cfg.probe_images else "train"
        )
        return cls(
            mode=cfg.mode,
            teachers=teachers,
            kd_source=kd_source,
            connector=connector,
            connector_targets=connector and kd_source == "connector",
            adaptive=teachers and cfg.mode in ("adaptive", "full"),
            trajectory=trajectory,
            cache=cache,
            cache_features=cache and connector,
            cache_predictions=cache and kd_source == "teachers",
            pool_batch=cfg.unlabelled_batch if uses_pool else 0,
            probe_split=probe_split,
        )

    @property
    def self_targets(self) -> bool:
        """The soft targets are the student's own earlier predictions (``self_train``)."""
        return self.kd_source == "self"

    @property
    def targets_from_teachers(self) -> bool:
        """The soft targets are the teachers' own predictions (their heads run, live or from the cache)."""
        return self.kd_source == "teachers"

    @property
    def live_teachers(self) -> bool:
        """The teachers run on every batch (no cache)."""
        return self.teachers and not self.cache

    @property
    def connector_on_labelled(self) -> bool:
        """The connector's only loss is on labels, so it runs on a batch's labelled rows alone."""
        return self.connector and not self.connector_targets

    def model_inputs(self) -> tuple[str, ...]:
        """What the model takes from a batch besides the image: the cached teacher maps and predictions, and the
        labels that pick the connector's rows."""
        inputs: tuple[str, ...] = ()
        if self.cache_features:
            inputs += ("teacher_features", "feature_scale")
        if self.cache_predictions:
            inputs += ("target_seg", "target_depth")
        if self.connector_on_labelled:
            inputs += ("label",)
        return inputs


def uses_teachers(mode: str) -> bool:
    """Whether a student of ``mode`` needs the teachers (every mode but mtl and self_train): what the adapters ask
    before they pass teacher folders."""
    return mode not in (MTL, SELF_TRAIN)


def _pool(meta: Mapping[str, Any] | None) -> tuple[int, bool]:
    """(frames missing some task's label, whether any of them carries a label): the train frames without every
    task's label, and the unlabelled split."""
    if meta is None:
        return 0, False
    unlabelled = split_count(dict(meta), UNLABELLED)
    train = meta.get("labelled", {}).get("train")
    if train is None:  # prepared before per-task budgets: every train frame is fully labelled
        return unlabelled, False
    partial = int(meta["counts"]["train"]) - int(train["all"])
    return unlabelled + partial, partial > 0
