"""The builder: the plan, the params, the prepared data and the teachers turned into what the engine trains (the
student, and the connector and teachers beside it), the objective it optimises, and the sets it reads.

The order of the steps is the order in which they draw from the global RNG (the student's, then the teachers',
then the connector's initial weights), so it is part of what makes a run reproducible: keep it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointdistill.config import DistillParams, Params
from jointdistill.data.contract import UNLABELLED, split_count
from jointdistill.data.prepared import Frames, PreparedDataset, TrainingSet, labelled_frames
from jointdistill.data.transforms import JointTransform
from jointdistill.distill import teacher_cache as tcache
from jointdistill.distill.connector import Connector
from jointdistill.distill.model import DistillModel
from jointdistill.distill.objective import StudentObjective
from jointdistill.distill.plan import DistillPlan
from jointdistill.distill.warmup import connector_metrics
from jointdistill.distill.weights import task_score
from jointdistill.errors import ConfigError
from jointdistill.models import TASKS, MultiHeadNet, build_student, model_flops
from jointdistill.models.checked import load_teacher
from jointdistill.training.checkpoints import seed_everything
from jointdistill.training.engine import compute_metrics
from jointdistill.training.objectives import make_objective
from jointdistill.training.sampling import EpochSampler, make_loader

log = logging.getLogger(__name__)


def probe_indices(candidates, count: int, seed: int) -> list[int]:
    """The fixed probe set: ``count`` of the ``candidates`` (frame indices of the probe split) chosen by the seed,
    in index order."""
    candidates = sorted(int(i) for i in candidates)
    if count > len(candidates):
        raise ConfigError(
            f"distill.probe_images={count} exceeds the {len(candidates)} frames to draw probes from; lower it"
        )
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return sorted(candidates[i] for i in torch.randperm(len(candidates), generator=g)[:count].tolist())


def probe_candidates(split: PreparedDataset, count: int) -> np.ndarray:
    """The frames the probes are drawn from: where the teachers' knowledge is the only supervision, frames with no
    label (the unlabelled split) or without some task's label. Never val: val decides the feedback and the best
    checkpoint. A fully labelled train split has no such frames: then any train frame, with a warning."""
    if split.split == UNLABELLED:
        return np.arange(len(split))
    labelled = labelled_frames(split)
    missing = np.flatnonzero(~(labelled["seg"] & labelled["depth"]))
    if len(missing) >= count:
        return missing
    log.warning(
        "distill: only %d train frames lack a label; the %d probe images are drawn from labelled train frames",
        len(missing),
        count,
    )
    return np.arange(len(split))


def student_frames(train: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(fully labelled train frames, the others): each step reads batch_size of the first and, where the plan adds
    a pool, frames of the second. Without any fully labelled frame, every train frame is the first kind."""
    labelled = labelled_frames(train)
    full = labelled["seg"] & labelled["depth"]
    if not full.any():
        return np.arange(len(train)), np.zeros(0, np.int64)
    return np.flatnonzero(full), np.flatnonzero(~full)


def check_top_k(student: MultiHeadNet, cfg: DistillParams, h: int, w: int) -> None:
    with torch.no_grad():
        gh, gw = student.encode(torch.zeros(1, 3, h, w)).shape[-2:]
    if cfg.top_k > gh * gw:
        raise ConfigError(f"distill.top_k={cfg.top_k} exceeds the {gh}×{gw} feature grid of {h}×{w} images")


def load_teachers(folders, meta: dict, val_ds, cfg: DistillParams, seed: int, device):
    """Both teachers, checked against the data, with their own val scores r^T measured once."""
    models, info, scores = [], {}, {}
    for task, path in zip(TASKS, folders, strict=True):
        model, info[task] = load_teacher(path, task, meta)
        models.append(model)
    n_cls, ignore = len(meta["classes"]), meta["ignore_index"]
    h, w = meta["resolution"]
    for task, model in zip(TASKS, models, strict=True):
        info[task]["flops"] = model_flops(model, h, w)
        sampler = EpochSampler(len(val_ds), cfg.batch_size, seed, False, drop_last=False)
        val = compute_metrics(
            model.to(device),
            make_objective(task, n_cls, ignore),
            make_loader(val_ds, sampler, cfg.batch_size, 0, device, False),
            device,
        )
        model.cpu()
        info[task]["val"] = val
        scores[task] = task_score(task, val)
        log.info(
            "distill: %s teacher val %s",
            task,
            {k: round(v, 4) for k, v in val.items() if k in ("miou", "pixacc", "abs_err", "rel_err")},
        )
    return models, info, scores


def _probe_targets(plan: DistillPlan, cache, teachers, probes: torch.Tensor, ids: list[int]) -> dict[str, torch.Tensor]:
    """The teachers' predictions on the probe images (seg logits, depth), from the cache or by running them once."""
    if plan.cache_predictions:
        pred = torch.from_numpy(np.asarray(cache[f"{plan.probe_split}_targets"][ids])).float()
        return {"seg": pred[:, :-1], "depth": pred[:, -1:]}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for task, teacher in zip(TASKS, teachers, strict=True):
            teacher.eval()
            out[task] = teacher.predict(teacher.encode(probes), probes.shape[-2:])[task].float()
    return out


@dataclass
class Built:
    """Everything a distill run trains and reads, as the builder made it."""

    student: MultiHeadNet
    model: DistillModel
    objective: StudentObjective
    train_ds: PreparedDataset  # the labelled train split (augmented)
    train_set: Any  # what the engine reads: train, or train followed by the unlabelled pool
    val_ds: PreparedDataset
    pool: tuple[int, int]  # (unlabelled frames, of them per step), for `engine.fit`
    epoch_samples: int | None  # labelled samples an epoch draws (None: one pass over train)
    teacher_info: dict | None  # per task: the teacher's record, FLOPs and val metrics
    cache_report: dict | None  # where the teacher cache is and what building it cost
    connector_val: Callable[[], dict] | None  # the connector's val metrics, where it exists
    labelled_train: int = 0  # fully labelled train frames: each step's batch_size part

    @property
    def teacher_digests(self) -> dict[str, str]:
        return {t: i["file_digest"] for t, i in (self.teacher_info or {}).items()}


def _teacher_cache(teacher_models, teacher_info, meta, data, folder: Path, device, batch_size):
    """The cache (built unless a matching one is in ``folder``) and its report."""
    key = tcache.cache_key({t: i["file_digest"] for t, i in teacher_info.items()}, meta)
    cache, reused = tcache.ensure(folder, teacher_models, key, data, device, batch_size)
    report = {
        "path": str(folder),
        "reused": reused,
        **{k: cache["meta"][k] for k in ("channels", "grid", "bytes", "build_seconds", "teacher_forward_images")},
    }
    return cache, report


def build(
    params: Params,
    plan: DistillPlan,
    data: Path,
    meta: dict,
    teachers: tuple[str | Path, str | Path] | None,
    device: torch.device,
    cache_folder: Path,
) -> Built:
    """The student, the model around it, its objective and its training sets, as ``plan`` says."""
    cfg = params.distill
    h, w = meta["resolution"]
    num_classes, ignore = len(meta["classes"]), meta["ignore_index"]
    seed_everything(params.seed)
    student = build_student(
        params.student.backbone,
        params.student.head,
        num_classes,
        params.student.pretrained_backbone,
        head_channels=params.student.head_channels,
        tiny_widths=tuple(params.student.widths),
    )
    check_top_k(student, cfg, h, w)
    val_ds = PreparedDataset(data, "val")
    plain_probe_split = PreparedDataset(data, plan.probe_split)  # without augmentation: the probe images
    probe_ids = probe_indices(probe_candidates(plain_probe_split, cfg.probe_images), cfg.probe_images, params.seed)

    teacher_models, teacher_info, teacher_scores = [], None, None
    if plan.teachers:  # mtl never loads, let alone runs, the teachers
        assert teachers is not None
        teacher_models, teacher_info, teacher_scores = load_teachers(teachers, meta, val_ds, cfg, params.seed, device)
    connector = None
    if plan.connector:
        connector = Connector([t.feature_channels for t in teacher_models], num_classes, cfg.connector_channels)
    probes = torch.stack([plain_probe_split[i]["image"] for i in probe_ids])
    cache: Any = None  # the cache's memory-mapped arrays, where the plan reads them
    cache_report, probe_feats = None, None
    if plan.cache:
        assert teacher_info is not None
        cache, cache_report = _teacher_cache(
            teacher_models, teacher_info, meta, data, cache_folder, device, cfg.batch_size
        )
        if plan.cache_features:
            probe_feats = torch.from_numpy(np.asarray(cache[plan.probe_split][probe_ids])).float()
    probe_targets = _probe_targets(plan, cache, teacher_models, probes, probe_ids) if plan.teachers else None
    model = DistillModel(
        student,
        connector,
        [] if plan.cache else teacher_models,  # with the cache no teacher runs: their outputs come from it
        probes,
        cfg.traj_every,
        cfg.traj_batch,
        probe_teacher_features=probe_feats,
        target_teachers=teacher_models if plan.targets_from_teachers else None,
        connector_on_labelled=plan.connector_on_labelled,
        ignore_index=ignore,
        self_train=plan.self_targets,
        probe_targets=probe_targets,
    )
    connector_val = None
    if plan.connector:
        val_c = PreparedDataset(data, "val", features=cache["val"] if plan.cache_features else None)

        def connector_val() -> dict:
            return connector_metrics(model, val_c, cfg.batch_size, device, num_classes, ignore)

    objective = StudentObjective(
        model,
        cfg,
        num_classes,
        ignore,
        teacher_scores,
        probe_ids,
        connector_val,
        plan=plan,
        max_depth=meta["depth_range"][1],
    )

    def training_split(split: str) -> PreparedDataset:
        return PreparedDataset(
            data,
            split,
            JointTransform.from_params(params.augment, h, w),
            seed=params.seed,
            features=cache[split] if plan.cache_features else None,
            targets=cache[f"{split}_targets"] if plan.cache_predictions else None,
            feature_stride=MultiHeadNet.feature_stride,
        )

    train_ds = training_split("train")
    # Each step reads `batch_size` fully labelled frames and, where the plan adds a pool, `pool_batch` frames
    # missing a task's label (a label budget's depth-only frames, the unlabelled split): there the teachers'
    # predictions stand in for the missing labels, and mtl learns from the labels those frames have. The labelled
    # part of a step is the same in every mode. An epoch draws as many frames as the data has, in every mode: a
    # budget takes labels away, not optimiser steps.
    labelled = [train_ds] if cfg.hold_out_val else [train_ds, training_split("val")]  # no held-out val: train on it
    core_parts: list[Any] = []
    pool_parts: list[Any] = []
    for ds in labelled:
        full_ids, partial_ids = student_frames(ds)
        core_parts.append(Frames(ds, full_ids) if len(partial_ids) else ds)
        if len(partial_ids):
            pool_parts.append(Frames(ds, partial_ids))
    unlabelled = split_count(meta, UNLABELLED)
    if unlabelled:
        pool_parts.append(training_split(UNLABELLED))
    pool = sum(len(p) for p in pool_parts)
    core = core_parts[0] if len(core_parts) == 1 else TrainingSet(*core_parts)
    train_set = TrainingSet(*core_parts, *pool_parts) if plan.pool_batch else core
    frames = sum(len(ds) for ds in labelled) + unlabelled
    return Built(
        student=student,
        model=model,
        objective=objective,
        train_ds=train_ds,
        train_set=train_set,
        val_ds=val_ds,
        pool=(pool if plan.pool_batch else 0, plan.pool_batch),
        epoch_samples=frames if frames > len(core) else None,
        teacher_info=teacher_info,
        cache_report=cache_report,
        connector_val=connector_val,
        labelled_train=len(core),
    )
