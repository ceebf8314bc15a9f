"""The connector's warm-up and its val metrics.

A connector trained from scratch beside the student gives poor soft targets for a long time (well below the
teachers, at times worse than the student on depth: docs/method.md, Evidence), so the KD modes first train
the connector alone on the frozen teachers' features for ``distill.connector_warmup`` steps; the student's KD
and trajectory terms start from targets about as good as the teachers' own. The warm-up is cheap with the
teacher cache (no teacher and no student runs), and its result is kept beside the checkpoints, so a resumed run
does not repeat it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sized
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset

from jointdistill.config import DistillParams
from jointdistill.distill.model import DistillModel, rescale_depth
from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter, depth_loss, seg_loss
from jointdistill.models.serialization import load_safe, save_atomic
from jointdistill.training.sampling import EpochSampler, make_loader

log = logging.getLogger(__name__)
WARMUP_FORMAT = "jointdistill.connector-warmup/1"
# Warm-up passes draw their order and augmentation from epochs far from the student's own (0, 1, …).
_EPOCH_OFFSET = 1_000_000


def _connector_outputs(model: DistillModel, batch: dict) -> dict:
    x = batch["image"]
    assert model.connector is not None
    if "teacher_features" in batch:
        feats = [batch["teacher_features"].to(x.dtype)]
    else:
        feats = model.teacher_features(x)
    return rescale_depth(model.connector(feats, x.shape[-2:]), batch.get("feature_scale"))


def warm_up(
    model: DistillModel,
    train_ds: Dataset,
    cfg: DistillParams,
    seed: int,
    device: torch.device,
    ignore_index: int,
    file: Path,
    digest: str,
    resume: bool,
) -> dict:
    """Train ``model.connector`` alone for ``cfg.connector_warmup`` steps (in place). Returns a report.

    ``file`` keeps the result (with ``digest``): with ``resume`` a matching one is loaded instead of training.
    """
    steps = cfg.connector_warmup
    connector = model.connector
    assert connector is not None, "warm-up needs a connector"
    if resume and file.exists():
        state = load_safe(file, "connector warm-up", WARMUP_FORMAT)
        if state.get("digest") == digest:
            connector.load_state_dict(state["connector"])
            log.info("distill: connector warm-up loaded from %s", file)
            return {**state["report"], "reused": True}
    t0 = time.perf_counter()
    model.to(device).train()
    opt = torch.optim.AdamW(connector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Poly decay to 0 over the warm-up; the joint phase then starts the connector at its own schedule's peak.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - min(s, steps) / max(steps, 1)) ** 0.9)
    sampler = EpochSampler(len(cast(Sized, train_ds)), cfg.batch_size, seed, True)
    done, epoch, losses = 0, 0, []
    while done < steps:
        sampler.set_epoch(_EPOCH_OFFSET + epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(_EPOCH_OFFSET + epoch)
        for batch in make_loader(train_ds, sampler, cfg.batch_size, cfg.num_workers, device, True):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = _connector_outputs(model, batch)
            loss = seg_loss(out["seg"].float(), batch["label"], ignore_index) + depth_loss(
                out["depth"].float(), batch["depth"], cfg.depth_loss
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(connector.parameters(), cfg.grad_clip)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite connector loss at warm-up step {done}")
            opt.step()
            sched.step()
            losses.append(value)
            done += 1
            if done >= steps:
                break
        epoch += 1
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(0)
    report = {
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    save_atomic(
        file, {"format": WARMUP_FORMAT, "digest": digest, "connector": connector.state_dict(), "report": report}
    )
    log.info(
        "distill: connector warmed up for %d steps in %.1f s (loss %.3f → %.3f)",
        steps,
        report["seconds"],
        report["first_loss"] or float("nan"),
        report["last_loss"] or float("nan"),
    )
    return {**report, "reused": False}


@torch.no_grad()
def connector_metrics(
    model: DistillModel, val_ds: Dataset, batch_size: int, device: torch.device, num_classes: int, ignore_index: int
) -> dict:
    """The connector's own predictions against val (exact over the split): mIoU, pixAcc, AbsErr, RelErr, δ1.

    ``val_ds`` brings ``teacher_features`` when the teachers' features are cached; else the teachers run."""
    connector = model.connector
    assert connector is not None, "scoring needs a connector"
    was = connector.training
    connector.eval()
    seg, dep = ConfusionMatrix(num_classes, ignore_index), DepthMeter()
    sampler = EpochSampler(len(cast(Sized, val_ds)), batch_size, 0, False, drop_last=False)
    try:
        for batch in make_loader(val_ds, sampler, batch_size, 0, device, False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = _connector_outputs(model, batch)
            seg.update(out["seg"].float(), batch["label"])
            dep.update(out["depth"].float(), batch["depth"])
    finally:
        connector.train(was)
    return {**seg.compute(), **dep.compute()}
