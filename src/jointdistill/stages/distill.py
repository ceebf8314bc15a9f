"""The `distill` stage: the multi-task student, trained from the two frozen teachers with JointDistill.

Modes (``distill.mode``): ``mtl`` (task losses only; the teachers are never loaded), ``static_kd`` (+ distillation
with ω = 1, from the teachers or the connector), ``adaptive`` (+ feedback-driven ω), ``full`` (+ the knowledge
trajectory loss: JointDistill). Before training: the teachers are checked against the data (task, classes,
normalisation) and their own val scores r^T are measured, and the connector, where it has a role (see
`needs_connector`), is warmed up alone on the teachers' features. Then the engine trains (checkpoints, exact
resume, AMP, DDP) with validation every timeframe (``distill.timeframe_steps`` steps), where ω is updated, the
connector is scored on val and the trajectories are recorded on a fixed set of train probe images. Outputs:
``student.pt``, ``report.json``, ``weights.csv``, ``trajectory.parquet``, ``lineage.json``; in the metrics folder
``metrics.json``, ``run.json`` and ``dvclive/`` (see `records`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from jointdistill.config import DistillParams, Params
from jointdistill.data.contract import UNLABELLED, split_count, verify_prepared
from jointdistill.data.prepared import PreparedDataset, TrainingSet
from jointdistill.data.transforms import JointTransform
from jointdistill.distill import teacher_cache as tcache
from jointdistill.distill.connector import Connector
from jointdistill.distill.model import DistillModel
from jointdistill.distill.objective import StudentObjective
from jointdistill.distill.warmup import connector_metrics, warm_up
from jointdistill.distill.weights import task_score
from jointdistill.errors import ConfigError
from jointdistill.models import TASKS, DenseNet, build_student, model_flops, save_model
from jointdistill.models.checked import load_teacher
from jointdistill.provenance import codeid, lineage
from jointdistill.stages.common import end_distributed, rank_and_world, run_key, test_metrics, write_output
from jointdistill.stages.results import StudentResult
from jointdistill.training.engine import EpochSampler, evaluate, fit, make_loader, resolve_device, seed_everything
from jointdistill.training.objectives import make_objective

log = logging.getLogger(__name__)
MODES = ("mtl", "static_kd", "adaptive", "full")


def needs_connector(cfg: DistillParams) -> bool:
    """Whether the connector has a role: its outputs are the soft targets (``kd_target: connector``), or the
    trajectory reads its fused map (``full``). Without one, static_kd and adaptive distil from the teachers'
    own predictions and skip its training, warm-up and per-timeframe scoring (a KD run then costs about what an
    mtl run does)."""
    return cfg.mode != "mtl" and (cfg.kd_target == "connector" or cfg.mode == "full")


def probe_indices(n_train: int, count: int, seed: int) -> list[int]:
    """The fixed probe set: ``count`` train images chosen by the seed, in index order. Not val: val decides the
    feedback and the best checkpoint, so the trajectory loss must not train on it."""
    if count > n_train:
        raise ConfigError(f"distill.probe_images={count} exceeds the {n_train} train images; lower it")
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return sorted(torch.randperm(n_train, generator=g)[:count].tolist())


def _load_teachers(folders, meta: dict, val_ds, cfg: DistillParams, seed: int, device):
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
        val = evaluate(
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


def _check_top_k(student: DenseNet, cfg: DistillParams, h: int, w: int) -> None:
    with torch.no_grad():
        gh, gw = student.encode(torch.zeros(1, 3, h, w)).shape[-2:]
    if cfg.top_k > gh * gw:
        raise ConfigError(f"distill.top_k={cfg.top_k} exceeds the {gh}×{gw} feature grid of {h}×{w} images")


# ----------------------------------------------------------------------------- outputs
# ----------------------------------------------------------------------------- the stage
def run(
    params: Params,
    data: str | Path,
    teachers: tuple[str | Path, str | Path] | None,
    out: str | Path,
    checkpoints: str | Path | None = None,
    resume: bool = False,
    teacher_cache: str | Path | None = None,
    metrics_dir: str | Path | None = None,
) -> StudentResult:
    """Distil the student on ``data`` from ``teachers`` = (seg folder, depth folder) into ``out``.

    With ``distill.teacher_cache`` the teachers' features come from a cache in ``teacher_cache`` (default: the
    checkpoint folder's ``teacher_cache/``), built there first unless a matching one exists.
    Returns the full report (rank 0). Every input is checked before any training starts.
    """
    cfg = params.distill
    data, out = Path(data), Path(out)
    meta = verify_prepared(data)
    h, w = meta["resolution"]
    num_classes, ignore = len(meta["classes"]), meta["ignore_index"]
    kd = cfg.mode != "mtl"
    if kd and not teachers:
        raise ConfigError(
            f"distill.mode={cfg.mode} needs the two teachers (--teachers SEG_DIR DEPTH_DIR); "
            "only mode mtl trains without them"
        )
    if teachers is not None and len(teachers) != 2:
        raise ConfigError(f"--teachers takes two folders (seg, then depth), got {len(teachers)}")
    checkpoints = Path(checkpoints) if checkpoints else out.parent / f".{out.name}.checkpoints"
    device = resolve_device(cfg.device)

    seed_everything(params.seed)
    student = build_student(
        params.student.backbone,
        params.student.head,
        num_classes,
        params.student.pretrained_backbone,
        head_channels=params.student.head_channels,
        tiny_widths=tuple(params.student.widths),
    )
    _check_top_k(student, cfg, h, w)
    val_ds = PreparedDataset(data, "val")
    plain_train = PreparedDataset(data, "train")  # without augmentation: the probe images
    probe_ids = probe_indices(len(plain_train), cfg.probe_images, params.seed)

    teacher_models, teacher_info, teacher_scores = [], None, None
    if kd:  # mtl never loads, let alone runs, the teachers
        teacher_models, teacher_info, teacher_scores = _load_teachers(teachers, meta, val_ds, cfg, params.seed, device)

    connector = None
    target_teachers = list(teacher_models)  # kept for kd_target=teachers even when the cache replaces them
    if needs_connector(cfg):
        connector = Connector([t.feature_channels for t in teacher_models], num_classes, cfg.connector_channels)
    probes = torch.stack([plain_train[i]["image"] for i in probe_ids])
    cache, cache_report, probe_feats = None, None, None
    if kd and cfg.teacher_cache:
        assert teacher_info is not None
        folder = Path(teacher_cache) if teacher_cache else checkpoints / "teacher_cache"
        key = tcache.cache_key({t: i["file_digest"] for t, i in teacher_info.items()}, meta)
        cache, reused = tcache.ensure(folder, teacher_models, key, data, device, cfg.batch_size)
        if connector is not None:
            probe_feats = torch.from_numpy(np.asarray(cache["train"][probe_ids])).float()
        cache_report = {
            "path": str(folder),
            "reused": reused,
            **{k: cache["meta"][k] for k in ("channels", "grid", "bytes", "build_seconds", "teacher_forward_images")},
        }
        teacher_models = []  # from here on no teacher runs: their features come from the cache
    model = DistillModel(
        student,
        connector,
        teacher_models,
        probes,
        cfg.traj_every,
        cfg.traj_batch,
        probe_teacher_features=probe_feats,
        target_teachers=target_teachers if cfg.kd_target == "teachers" else None,
        connector_on_labelled=cfg.kd_target == "teachers",
        ignore_index=ignore,
    )
    connector_val = None
    if connector is not None:
        val_c = PreparedDataset(data, "val", features=cache["val"] if cache is not None else None)

        def connector_val() -> dict:
            return connector_metrics(model, val_c, cfg.batch_size, device, num_classes, ignore)

    job = StudentObjective(model, cfg, num_classes, ignore, teacher_scores, probe_ids, connector_val)

    digest = run_key(
        {
            "distill": cfg.model_dump(mode="json"),
            "student": params.student.model_dump(mode="json"),
            "augment": params.augment.model_dump(mode="json"),
            "seed": params.seed,
            "data": meta.get("source_checksum"),
            "code": codeid.source_digest(__name__),
            "teachers": {t: i["file_digest"] for t, i in (teacher_info or {}).items()},
        }
    )

    def training_split(split: str) -> PreparedDataset:
        return PreparedDataset(
            data,
            split,
            JointTransform.from_params(params.augment, h, w),
            seed=params.seed,
            features=cache[split] if cache is not None and connector is not None else None,
            targets=cache[f"{split}_targets"] if cache is not None and cfg.kd_target == "teachers" else None,
            feature_stride=DenseNet.feature_stride,
        )

    train_ds = training_split("train")
    # Under a label budget the KD modes also learn from the teachers' predictions on the unlabelled split: each
    # step adds `unlabelled_batch` of its images to `batch_size` labelled ones, so the labels weigh as much as in
    # mtl. An epoch draws as many labelled samples as the whole train split had, in every mode: a budget takes
    # labels away, not optimiser steps.
    pool = split_count(meta, UNLABELLED)
    pool_batch = cfg.unlabelled_batch if pool and kd else 0
    train_set = TrainingSet(train_ds, training_split(UNLABELLED)) if pool_batch else train_ds
    epoch_samples = len(train_ds) + pool if pool else None
    t0 = time.perf_counter()
    warmup_report = None
    if connector is not None and cfg.connector_warmup:
        before = _short(connector_val())
        warmup_report = warm_up(
            model, train_ds, cfg, params.seed, device, ignore, checkpoints / "connector-warmup.pt", digest, resume
        )
        warmup_report["val_before"], warmup_report["val"] = before, _short(connector_val())
        log.info("distill: connector after warm-up: val %s", warmup_report["val"])
        seed_everything(params.seed)  # the student's run draws the same numbers whether or not it warmed up here
    result = fit(
        model,
        job,
        train_set,
        val_ds,
        cfg,
        params.seed,
        checkpoints,
        digest,
        resume=resume,
        log_name=f"distill-{cfg.mode}",
        eval_every=cfg.timeframe_steps or None,
        epoch_samples=epoch_samples,
        pool=(pool if pool_batch else 0, pool_batch),
    )
    train_seconds = time.perf_counter() - t0

    best = {k.removeprefix("student."): v for k, v in result.best_state.items() if k.startswith("student.")}
    student.load_state_dict(best)
    rank, world = rank_and_world()
    test = test_metrics(student, job, PreparedDataset(data, "test"), cfg.batch_size, params.seed, device)
    ips = float(np.mean([e["train/images_per_second"] for e in result.history])) if result.history else None
    report = {
        "mode": cfg.mode,
        "monitor": job.monitor,
        "val": result.best_metrics,
        "test": test,
        "teachers": teacher_info,
        "weights": {"final": job.omega(), "history": list(job.weights.history) if job.weights else []},
        "trajectory": {},
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "epochs": cfg.epochs,
        # Labelled images, the unlabelled split's size and how many of them each step adds (KD modes), and the
        # labelled samples an epoch draws.
        "data": {
            "train": len(train_ds),
            "unlabelled": pool if pool_batch else 0,
            "unlabelled_batch": pool_batch,
            "epoch_samples": epoch_samples or len(train_ds),
        },
        "timeframes": len(result.history),
        "train_seconds": round(train_seconds, 2),
        # Validation, the ω update, connector scoring and trajectory records: the price of the timeframes.
        "validation_seconds": round(result.validation_seconds, 2),
        "validation_share": round(result.validation_seconds / train_seconds, 4) if train_seconds > 0 else None,
        "connector": {
            "warmup": warmup_report,
            "history": [_short(h) | {"timeframe": h["timeframe"]} for h in job.connector_history],
        },
        "gradients": job.gradient_summary(),
        "flops": {"student": model_flops(student, h, w)},
        # Training loop only (data, forward, backward, step), per process; validation excluded.
        "seconds_per_step": round((cfg.batch_size + pool_batch) / ips, 5) if ips else None,
        "train_images_per_second": round(ips, 2) if ips else None,
        # Images the teachers ran on in this process: per step without the cache, once when it was built.
        "teacher_forward_images": model.teacher_images
        + (cache_report["teacher_forward_images"] if cache_report and not cache_report["reused"] else 0),
        "teacher_cache": cache_report,
        "history": result.history,
        "resumed_from_step": result.resumed_from,
        "world_size": world,
        "model": {
            "backbone": params.student.backbone,
            "head": params.student.head,
            "parameters": sum(p.numel() for p in student.parameters()),
        },
        "params_digest": params.digest("distill"),
    }
    if rank == 0:

        def files(tmp: Path) -> None:
            save_model(
                tmp / "student.pt",
                student,
                best,
                task="multi",
                mode=cfg.mode,
                classes=meta["classes"],
                palette=meta["palette"],
                normalization=meta["normalization"],
                resolution=meta["resolution"],
                ignore_index=ignore,
                data_checksum=meta.get("source_checksum"),
                params_digest=params.digest("distill"),
                best_epoch=result.best_epoch,
                val=result.best_metrics,
                teachers={t: i["file_digest"] for t, i in (teacher_info or {}).items()},
            )
            job.write_weights(tmp / "weights.csv")
            report["trajectory"] = job.write_trajectory(tmp / "trajectory.parquet", train_seconds)

        parents = {"prepared": data, **dict(zip(("teacher_seg", "teacher_depth"), teachers or ()))}
        record = lineage.record("distill", params.digest("distill"), parents, module=__name__)
        write_output(out, files, report, curated, record, metrics_dir, checkpoints / "dvclive")
        log.info(
            "distill-%s: best epoch %d, val mIoU %.4f AbsErr %.3f, test mIoU %.4f AbsErr %.3f → %s",
            cfg.mode,
            result.best_epoch,
            result.best_metrics["miou"],
            result.best_metrics["abs_err"],
            test["miou"],
            test["abs_err"],
            out,
        )
    end_distributed()
    return StudentResult(report)


def curated(report: dict) -> dict:
    """The student's few numbers for metrics.json: test metrics and training time (the rest is in report.json)."""
    return {
        **{k: report["test"][k] for k in ("miou", "pixacc", "abs_err", "rel_err", "delta1")},
        "seconds": report["train_seconds"],
    }


def _short(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 5) for k in ("miou", "pixacc", "abs_err", "rel_err", "delta1") if k in metrics}
