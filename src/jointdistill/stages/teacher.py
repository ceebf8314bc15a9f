"""The `train-teacher` stage: one single-task teacher (seg or depth) on the prepared data.

Trains on train, keeps the best epoch on val, reports val and test metrics next to trivial baselines
(majority class, mean training depth), and writes ``model.pt``, ``metrics.json`` and ``dvclive/``.
Checkpoints live in a separate folder that survives failed runs; ``resume=True`` continues from it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from jointdistill.config import Params
from jointdistill.data.contract import UNLABELLED, open_split, split_count, verify_prepared
from jointdistill.data.prepared import Frames, PreparedDataset, labelled_frames
from jointdistill.data.transforms import JointTransform
from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter
from jointdistill.models import TASKS, build_teacher, model_flops, save_model
from jointdistill.provenance import codeid, lineage
from jointdistill.stages.common import data_record, end_distributed, rank_and_world, run_key, test_metrics, write_output
from jointdistill.stages.results import TeacherResult
from jointdistill.training.checkpoints import seed_everything
from jointdistill.training.devices import resolve_device
from jointdistill.training.engine import fit
from jointdistill.training.objectives import make_objective

log = logging.getLogger(__name__)


def curated(report: dict) -> dict:
    """The teacher's few numbers for metrics.json (test metrics and training time; the rest is in report.json).
    Every stage uses the same few names, so that `dvc metrics show` stays one narrow table."""
    keys = ("miou", "pixacc") if report["task"] == "seg" else ("abs_err", "rel_err", "delta1")
    return {**{k: report["test"][k] for k in keys}, "seconds": report["train_seconds"]}


def trivial_baseline(data_dir: Path, task: str, meta: dict, split: str = "test") -> dict:
    """What a model that ignores the image scores: the majority training class, or the mean training depth."""
    arrays = open_split(data_dir, split, meta)
    if task == "seg":
        majority = int(np.argmax(meta["class_pixels"]["train"]))
        cm = ConfusionMatrix(len(meta["classes"]), meta["ignore_index"])
        for i in range(0, len(arrays["labels"]), 64):
            labels = torch.from_numpy(np.array(arrays["labels"][i : i + 64]))
            cm.update(torch.full_like(labels, majority), labels)
        return {"predict": f"class {meta['classes'][majority]}", **cm.compute()}
    train = open_split(data_dir, "train", meta)["depth"]
    total, count = 0.0, 0
    for i in range(0, len(train), 64):
        d = np.asarray(train[i : i + 64], dtype=np.float64)
        total, count = total + d[d > 0].sum(), count + int((d > 0).sum())
    mean = total / max(count, 1)
    dm = DepthMeter()
    for i in range(0, len(arrays["depth"]), 64):
        gt = torch.from_numpy(np.array(arrays["depth"][i : i + 64]))
        dm.update(torch.full_like(gt, mean), gt)
    return {"predict": f"{mean:.3f} m everywhere", **dm.compute()}


def run(
    params: Params,
    task: str,
    data: str | Path,
    out: str | Path,
    checkpoints: str | Path | None = None,
    resume: bool = False,
    metrics_dir: str | Path | None = None,
) -> TeacherResult:
    """Train the ``task`` teacher on ``data`` into ``out`` (model.pt, report.json, lineage.json); metrics.json,
    run.json and dvclive/ go to ``metrics_dir`` (default: ``out``). Returns the full report (rank 0)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    data, out = Path(data), Path(out)
    spec = params.teacher.for_task(task)
    meta = verify_prepared(data)
    h, w = meta["resolution"]
    checkpoints = Path(checkpoints) if checkpoints else out.parent / f".{out.name}.checkpoints"
    digest = run_key(
        {"task": task, "spec": spec.model_dump(mode="json"), "augment": params.augment.model_dump(mode="json")}
        | {"seed": params.seed, "data": meta.get("source_checksum"), "code": codeid.source_digest(__name__)}
    )

    model, objective, train_ds, epoch_samples = _build(params, task, data, meta)
    t0 = time.perf_counter()
    result = fit(
        model,
        objective,
        train_ds,
        PreparedDataset(data, "val"),
        spec,
        params.seed,
        checkpoints,
        digest,
        resume=resume,
        log_name=f"teacher-{task}",
        epoch_samples=epoch_samples,
    )
    train_seconds = time.perf_counter() - t0

    # Test metrics of the best epoch, evaluated on every rank's shard and reduced.
    model.load_state_dict(result.best_state)
    test_ds = PreparedDataset(data, "test")
    test = test_metrics(model, objective, test_ds, spec.batch_size, params.seed, resolve_device(spec.device))
    baseline = trivial_baseline(data, task, meta)
    rank, world = rank_and_world()
    flops = model_flops(model, h, w)
    report = TeacherResult.from_run(
        params,
        task,
        objective,
        model,
        result,
        test,
        baseline,
        len(train_ds),
        epoch_samples,
        train_seconds,
        flops,
        world,
    )
    if rank == 0:

        def files(tmp: Path) -> None:
            save_model(
                tmp / "model.pt",
                model,
                result.best_state,
                task=task,
                **data_record(meta),
                params_digest=params.digest("teacher", task),
                best_epoch=result.best_epoch,
                val=result.best_metrics,
            )

        digest_of = params.digest("teacher", task)
        record = lineage.record(f"train-teacher-{task}", digest_of, {"prepared": data}, module=__name__)
        write_output(out, files, report, curated, record, metrics_dir, checkpoints / "dvclive")
        log.info("teacher-%s: %s → %s", task, report.headline(), out)
    end_distributed()
    return report


def _build(params: Params, task: str, data: Path, meta: dict):
    """The teacher (its initial weights drawn from the seed), its objective, its augmented train split and how many
    samples an epoch draws."""
    spec = params.teacher.for_task(task)
    h, w = meta["resolution"]
    seed_everything(params.seed)
    model = build_teacher(
        task,
        spec.backbone,
        spec.head,
        len(meta["classes"]),
        spec.pretrained_backbone,
        head_channels=spec.head_channels,
        tiny_widths=tuple(spec.widths),
    )
    split = PreparedDataset(data, "train", JointTransform.from_params(params.augment, h, w), seed=params.seed)
    # Each teacher trains on its own task's labelled frames.
    ids = np.flatnonzero(labelled_frames(split)[task])
    train_ds = Frames(split, ids) if len(ids) < len(split) else split
    objective = make_objective(task, len(meta["classes"]), meta["ignore_index"], spec.depth_loss)
    # Under a label budget an epoch still draws as many samples as the data has frames: a budget takes labels
    # away, not optimiser steps.
    frames = len(split) + split_count(meta, UNLABELLED)
    return model, objective, train_ds, frames if frames > len(train_ds) else None
