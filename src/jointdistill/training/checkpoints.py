"""What a killed run resumes from: the checkpoint (model, optimiser, schedule, scaler, the objective's own state,
the run's counters, the best weights so far) and every global RNG, plus the dvclive logs trimmed to match.

Reproducibility contract: the global RNG (dropout) is saved in every checkpoint, and the data order and
augmentation are drawn from (seed, epoch, item) (see `sampling`), so a run resumed from any checkpoint reaches
exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from jointdistill.io import atomic_write_text
from jointdistill.models.serialization import load_safe, save_atomic
from jointdistill.training.devices import unwrap
from jointdistill.training.objectives import Objective

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "jointdistill.checkpoint/1"


@dataclass
class RunState:
    """Everything a checkpoint restores besides the model and optimiser."""

    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already done
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    best_step: int = 0
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    # Loss sums since the last validation, so their mean is the same whether or not the run was resumed.
    epoch_sums: dict = field(default_factory=dict)
    epoch_seen: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All global RNG states, as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(cast(np.ndarray, keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint (weights_only); a corrupt or foreign file is a `ModelError`."""
    return load_safe(path, "checkpoint", CHECKPOINT_FORMAT)


@dataclass
class Trainee:
    """What a checkpoint holds the state of: the model and what optimises it, and the objective."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    objective: Objective

    def save(self, path: Path, digest: str, state: RunState, best_state: dict) -> None:
        save_atomic(
            path,
            {
                "format": CHECKPOINT_FORMAT,
                "digest": digest,
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "run": state.__dict__,
                "best_model": best_state,
                "rng": rng_state(),
                "objective": self.objective.state_dict(),
            },
        )

    def load(self, path: Path, digest: str, log_name: str) -> tuple[RunState, dict] | None:
        """Load the checkpoint into the model, optimiser, schedule, scaler, objective and RNG: (run state, best
        weights); or None, with a warning, when it was made with other params, data or code."""
        ckpt = load_checkpoint(path)
        if ckpt.get("digest") != digest:
            log.warning("%s: checkpoint %s was made with other params, data or code; starting afresh", log_name, path)
            return None
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        state = RunState(**ckpt["run"])
        self.objective.load_state_dict(ckpt["objective"])
        set_rng_state(ckpt["rng"])
        log.info("%s: resumed from %s at epoch %d, step %d", log_name, path, state.epoch + 1, state.global_step)
        return state, ckpt["best_model"]


def restore(run_dir: Path, trainee: Trainee, resume: bool, main: bool, digest: str, log_name: str):
    """(run state, best weights) from ``run_dir/last.pt`` when resuming from one made with ``digest``, else None.
    A fresh run must not inherit an old checkpoint or logs: rank 0 removes them, and only them (the folder itself
    may be one the user chose)."""
    path = run_dir / "last.pt"
    if resume and path.exists():
        return trainee.load(path, digest, log_name)
    if not resume and main:
        path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "dvclive", ignore_errors=True)
    return None


def prune_live(folder: Path, steps: int) -> None:
    """Drop the dvclive rows of steps ≥ ``steps`` (logged after the checkpoint a run resumes from, by the run that
    was killed): the resumed run logs those validations again, and would otherwise repeat their steps."""
    for tsv in folder.glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step")
        kept = [lines[0], *(ln for ln in lines[1:] if int(ln.split("\t")[col]) < steps)]
        if len(kept) < len(lines):
            atomic_write_text(tsv, "".join(kept))


def open_live(run_dir: Path, state: RunState, resumed_from: int | None, main: bool):
    """dvclive's logger in ``run_dir/dvclive`` on rank 0 (None elsewhere); a resumed run first drops the rows the
    killed run logged after its last checkpoint."""
    if not main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    from dvclive import Live

    if resumed_from is not None:
        prune_live(run_dir / "dvclive", len(state.history))
    return Live(
        dir=str(run_dir / "dvclive"), resume=resumed_from is not None, dvcyaml=None, save_dvc_exp=False, report=None
    )


def log_live(live, history: list[dict]) -> None:
    """The last history row to dvclive (rank 0's; other ranks have none), as step len(history) - 1 (right after
    a resume too)."""
    if live is None:
        return
    live.step = len(history) - 1
    for k, v in history[-1].items():
        if k not in ("epoch", "step"):
            live.log_metric(k, v)
    live.next_step()
