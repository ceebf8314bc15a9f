"""The `distill` stage: the multi-task student, trained from the two frozen teachers with JointDistill.

Reads top to bottom: verify the inputs, build what the plan asks for (`distill.plan`, `distill.builder`), warm up
the connector where it has a role, fit (checkpoints, exact resume, AMP, DDP; a timeframe of validation, ω update,
connector scoring and trajectory records every ``distill.timeframe_steps`` steps), score the best weights on test,
write. Outputs: ``student.pt``, ``report.json``, ``weights.csv``, ``trajectory.parquet``, ``lineage.json``; in the
metrics folder ``metrics.json``, ``run.json`` and ``dvclive/`` (see `records`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jointdistill.config import Params
from jointdistill.data.contract import verify_prepared
from jointdistill.data.prepared import PreparedDataset
from jointdistill.distill.builder import Built, build
from jointdistill.distill.plan import DistillPlan
from jointdistill.distill.warmup import warm_up
from jointdistill.errors import ConfigError
from jointdistill.models import model_flops, save_model
from jointdistill.provenance import codeid, lineage
from jointdistill.stages.common import data_record, end_distributed, rank_and_world, run_key, test_metrics, write_output
from jointdistill.stages.results import StudentResult, short_metrics
from jointdistill.training.checkpoints import seed_everything
from jointdistill.training.devices import resolve_device
from jointdistill.training.engine import fit

log = logging.getLogger(__name__)


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

    With ``distill.teacher_cache`` the teachers' outputs come from a cache in ``teacher_cache`` (default: the
    checkpoint folder's ``teacher_cache/``), built there first unless a matching one exists.
    Returns the full report (rank 0). Every input is checked before any training starts.
    """
    cfg = params.distill
    data, out = Path(data), Path(out)
    meta = verify_prepared(data)
    plan = DistillPlan.from_params(cfg, meta)
    _check_teachers(plan, cfg.mode, teachers)
    checkpoints = Path(checkpoints) if checkpoints else out.parent / f".{out.name}.checkpoints"
    device = resolve_device(cfg.device)

    built = build(params, plan, data, meta, teachers, device, Path(teacher_cache or checkpoints / "teacher_cache"))
    digest = _run_key(params, meta, built)
    t0 = time.perf_counter()
    warmup = _warm_up(params, plan, built, meta, device, checkpoints, digest, resume)
    fitted = fit(
        built.model,
        built.objective,
        built.train_set,
        built.val_ds,
        cfg,
        params.seed,
        checkpoints,
        digest,
        resume=resume,
        log_name=f"distill-{cfg.mode}",
        eval_every=cfg.timeframe_steps or None,
        epoch_samples=built.epoch_samples,
        pool=built.pool,
    )
    train_seconds = time.perf_counter() - t0

    best = {k.removeprefix("student."): v for k, v in fitted.best_state.items() if k.startswith("student.")}
    built.student.load_state_dict(best)
    test_ds = PreparedDataset(data, "test")
    test = test_metrics(built.student, built.objective, test_ds, cfg.batch_size, params.seed, device)
    flops = model_flops(built.student, *meta["resolution"])
    rank, world = rank_and_world()
    report = StudentResult.from_run(params, plan, meta, built, fitted, test, warmup, train_seconds, flops, world)
    if rank == 0:

        def files(tmp: Path) -> None:
            record = {"mode": cfg.mode, **data_record(meta), "params_digest": params.digest("distill")}
            record |= {"best_epoch": fitted.best_epoch, "val": fitted.best_metrics, "teachers": built.teacher_digests}
            save_model(tmp / "student.pt", built.student, best, task="multi", **record)
            built.objective.write_weights(tmp / "weights.csv")
            report["trajectory"] = built.objective.write_trajectory(tmp / "trajectory.parquet", train_seconds)

        parents = {"prepared": data, **dict(zip(("teacher_seg", "teacher_depth"), teachers or ()))}
        record = lineage.record("distill", params.digest("distill"), parents, module=__name__)
        write_output(out, files, report, StudentResult.curated, record, metrics_dir, checkpoints / "dvclive")
        log.info("distill-%s: %s → %s", cfg.mode, report.headline(), out)
    end_distributed()
    return report


def _check_teachers(plan: DistillPlan, mode: str, teachers) -> None:
    if plan.teachers and not teachers:
        raise ConfigError(
            f"distill.mode={mode} needs the two teachers (--teachers SEG_DIR DEPTH_DIR); only modes mtl and "
            "self_train train without them"
        )
    if teachers is not None and len(teachers) != 2:
        raise ConfigError(f"--teachers takes two folders (seg, then depth), got {len(teachers)}")


def _run_key(params: Params, meta: dict, built: Built) -> str:
    """The key of this run's checkpoints: everything that decides it (params, data, code, the teachers' files)."""
    return run_key(
        {
            "distill": params.distill.model_dump(mode="json"),
            "student": params.student.model_dump(mode="json"),
            "augment": params.augment.model_dump(mode="json"),
            "seed": params.seed,
            "data": meta.get("source_checksum"),
            "code": codeid.source_digest(__name__),
            "teachers": built.teacher_digests,
        }
    )


def _warm_up(params, plan, built: Built, meta, device, checkpoints: Path, digest: str, resume: bool) -> dict | None:
    """The connector trained alone first, where it has a role (see `distill.warmup`): its report, or None."""
    if not (plan.connector and params.distill.connector_warmup):
        return None
    assert built.connector_val is not None
    before = short_metrics(built.connector_val())
    file = checkpoints / "connector-warmup.pt"
    ignore = meta["ignore_index"]
    report = warm_up(built.model, built.train_ds, params.distill, params.seed, device, ignore, file, digest, resume)
    report["val_before"], report["val"] = before, short_metrics(built.connector_val())
    log.info("distill: connector after warm-up: val %s", report["val"])
    seed_everything(params.seed)  # the student's run draws the same numbers whether or not it warmed up here
    return report
