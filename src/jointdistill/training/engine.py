"""The training loop shared by the teachers and the student.

Read top to bottom: `train_step`, `train_one_epoch`, `compute_metrics`, `fit`. An `Objective` supplies what differs
between the things trained (the loss, the metrics and the number that selects the best weights); the loop owns the
optimiser and schedule, gradient clipping, progress, validation and logging. What surrounds it lives beside it:
`sampling` (data order, loaders), `checkpoints` (checkpoints, RNG state, resume), `devices` (device, AMP,
channels_last, torch.compile, DDP under ``torchrun``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from jointdistill.config import OptimParams
from jointdistill.errors import ModelError
from jointdistill.training.checkpoints import RunState, Trainee, log_live, open_live, restore
from jointdistill.training.devices import Dist, init_distributed, network_of, place, resolve_device, unwrap, wrap_ddp
from jointdistill.training.objectives import Objective
from jointdistill.training.sampling import EpochSampler, make_loader, to_device

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, spec: OptimParams) -> torch.optim.Optimizer:
    # No weight decay on norms and biases.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=True)
    # The fused CUDA kernel: one launch for all parameters instead of several per tensor.
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=spec.lr, fused=fused)


def build_scheduler(opt: torch.optim.Optimizer, spec: OptimParams, total_steps: int):
    warm = spec.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if spec.schedule == "poly":
            return (1 - progress) ** 0.9
        if spec.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_gradients(model: nn.Module, max_norm: float) -> list[torch.Tensor]:
    """Clip the gradient norm to ``max_norm``, separately per group of the network's ``clip_groups()`` (networks
    trained side by side with their own objectives, e.g. the student and the connector: one's large gradients must
    not shrink the other's step). Returns the norms before clipping, as 0-d tensors on the model's device (reading
    them would wait for the GPU)."""
    net = network_of(model)
    groups = net.clip_groups() if net is not None else [list(model.parameters())]
    return [torch.nn.utils.clip_grad_norm_(g, max_norm) for g in groups if g]


# ----------------------------------------------------------------------------- steps and passes
def train_step(
    model, objective: Objective, batch: dict, opt, sched, scaler, spec, amp, where: str = ""
) -> tuple[float, dict]:
    """One optimisation step on a batch already on the device. Returns the loss and its parts as floats.

    The host waits for the device once per step, after backward and before the optimiser (an objective's loss
    parts are 0-d tensors, read together): the forward and backward are queued without a pause, and a
    non-finite loss still stops the run before it changes any weight."""
    with torch.autocast(batch["image"].device.type, dtype=amp, enabled=amp is not None):
        outputs = model(batch["image"], **{k: batch[k] for k in objective.model_inputs})
        loss, parts = objective.loss(outputs, batch)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if spec.grad_clip:
        scaler.unscale_(opt)
        clip_gradients(model, spec.grad_clip)
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]).tolist()
    parts = dict(zip(parts, values[1:], strict=True))
    if not math.isfinite(values[0]):
        raise FloatingPointError(f"non-finite loss{where}: {parts}")
    scaler.step(opt)
    scaler.update()
    sched.step()
    return values[0], parts


def train_one_epoch(
    model,
    objective: Objective,
    loader,
    opt,
    sched,
    scaler,
    spec,
    device,
    state: RunState,
    amp,
    channels_last,
    on_step: Callable[[], None],
    show: bool,
    total_batches: int,
) -> None:
    """One pass over ``loader``; the loss sums since the last validation accumulate in ``state``."""
    model.train()
    n_seen, t0 = 0, time.perf_counter()
    bar = tqdm(
        total=total_batches,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{spec.epochs}",
        unit="batch",
        disable=None if show else True,
        leave=False,
    )
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        where = f" at epoch {state.epoch + 1}, step {state.global_step}"
        loss, parts = train_step(model, objective, batch, opt, sched, scaler, spec, amp, where)
        state.step_in_epoch += 1
        state.global_step += 1
        bs = batch["image"].shape[0]
        n_seen += bs
        state.epoch_seen += bs
        for k, v in {"loss": loss, **parts}.items():
            state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v * bs
        bar.update(1)
        if show:
            extra = objective.progress(parts)
            bar.set_postfix(loss=f"{loss:.4f}", **extra, img_s=f"{n_seen / (time.perf_counter() - t0):.1f}")
        on_step()
    bar.close()


def interval_logs(state: RunState, train_seconds: float, images: int) -> dict:
    """Mean loss parts since the last validation, and the training throughput over that interval."""
    out = {f"train/{k}": v / max(state.epoch_seen, 1) for k, v in state.epoch_sums.items()}
    out["train/images_per_second"] = images / train_seconds if train_seconds > 0 else 0.0
    return out


@torch.no_grad()
def compute_metrics(
    model: nn.Module, objective: Objective, loader, device: torch.device, amp=None, channels_last=False
) -> dict:
    """Exact metrics over the whole split (all ranks' shards reduced)."""
    was_training = model.training
    model.eval()
    meters = objective.new_meters()
    for batch in loader:
        batch = to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = model(batch["image"])
        objective.update(meters, {k: v.float() for k, v in outputs.items()}, batch)
    for m in meters.values() if isinstance(meters, dict) else [meters]:
        m.reduce()
    model.train(was_training)
    return objective.compute(meters)


# ----------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    best_state: dict
    best_metrics: dict
    best_epoch: int
    history: list
    seconds: float
    resumed_from: int | None
    validation_seconds: float = 0.0  # of ``seconds``, spent in validation and the objective's timeframe hook
    best_step: int = 0


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def _show_progress(main: bool) -> bool:
    """Progress bars on rank 0, unless ``JOINTDISTILL_PROGRESS=off``."""
    return main and os.environ.get("JOINTDISTILL_PROGRESS", "auto") != "off"


def _samplers(train_ds, val_ds, spec: OptimParams, seed: int, ddp: Dist, epoch_samples, pool) -> tuple:
    """(train sampler, val sampler, steps per epoch); a train split smaller than one global batch is an error."""
    train = EpochSampler(
        len(train_ds) - pool[0],
        spec.batch_size,
        seed,
        True,
        ddp.rank,
        ddp.world,
        length=epoch_samples,
        pool=pool[0],
        pool_batch=pool[1],
    )
    val = EpochSampler(len(val_ds), spec.batch_size, seed, False, ddp.rank, ddp.world, drop_last=False)
    steps = train.batches_per_epoch()
    if steps == 0:
        raise ModelError(
            f"train has {len(train_ds) - pool[0]} labelled samples: fewer than one batch of {spec.batch_size} × "
            f"{ddp.world} processes"
        )
    return train, val, steps


@dataclass
class _Run:
    """One fit's moving parts, and what happens at a timeframe (validation) and at a checkpoint."""

    trainee: Trainee
    state: RunState
    best_state: dict
    spec: OptimParams
    ddp: Dist
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    val_ds: Any
    val_sampler: EpochSampler
    run_dir: Path
    digest: str
    live: Any
    log_name: str
    eval_every: int | None
    total_steps: int
    validation_seconds: float = 0.0
    train_t0: float = 0.0

    def train(self, train_ds, sampler: EpochSampler, steps_per_epoch: int) -> float:
        """Every remaining epoch (from where a resumed run stopped); returns the seconds it took."""
        state, spec, trainee = self.state, self.spec, self.trainee
        show = _show_progress(self.ddp.main)
        t0 = self.train_t0 = time.perf_counter()
        while state.epoch < spec.epochs:
            sampler.set_epoch(state.epoch, skip_batches=state.step_in_epoch)
            if hasattr(train_ds, "set_epoch"):  # a dataset that draws augmentation per epoch (not a hook)
                train_ds.set_epoch(state.epoch)
            loader = make_loader(train_ds, sampler, sampler.step_size, spec.num_workers, self.device, True)
            train_one_epoch(
                trainee.model,
                trainee.objective,
                loader,
                trainee.opt,
                trainee.sched,
                trainee.scaler,
                spec,
                self.device,
                state,
                self.amp,
                self.channels_last,
                self.on_step,
                show,
                steps_per_epoch,
            )
            if not self.eval_every:
                self.validate()
            state.epoch += 1
            state.step_in_epoch = 0
            self.checkpoint()
        if self.live is not None:
            self.live.end()
        return time.perf_counter() - t0

    def checkpoint(self) -> None:
        if self.ddp.main:
            self.trainee.save(self.run_dir / "last.pt", self.digest, self.state, self.best_state)

    def on_step(self) -> None:
        step = self.state.global_step
        if self.eval_every and (step % self.eval_every == 0 or step == self.total_steps):
            self.validate()
            self.checkpoint()
        elif step % self.spec.checkpoint_every == 0:
            self.checkpoint()

    def validate(self) -> None:
        """Validation = one timeframe: metrics on val, best weights, the objective's hook, logs."""
        state, objective, spec = self.state, self.trainee.objective, self.spec
        model = unwrap(self.trainee.model)  # the bare module: DDP's forward is a collective, and val shards differ
        t_val = time.perf_counter()
        train_logs = interval_logs(state, t_val - self.train_t0, state.epoch_seen)
        loader = make_loader(self.val_ds, self.val_sampler, spec.batch_size, spec.num_workers, self.device, False)
        val = compute_metrics(model, objective, loader, self.device, self.amp, self.channels_last)
        value = val[objective.monitor]
        better = objective.keep_last or _is_better(value, state.best_value, objective.higher_is_better)
        if better:
            state.best_value, state.best_epoch, state.best_metrics = value, state.epoch, val
            state.best_step = state.global_step
            self.best_state = copy.deepcopy(model.state_dict())
        scalars = {f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}
        extra = objective.end_timeframe(len(state.history) + 1, state.global_step, val, model)
        lr = self.trainee.sched.get_last_lr()[0]
        state.history.append(
            {"epoch": state.epoch + 1, "step": state.global_step, **train_logs, **scalars, "lr": lr, **extra}
        )
        log_live(self.live, state.history)
        log.info(
            "%s: epoch %d/%d, step %d  loss %.4f  val %s=%.4f%s",
            self.log_name,
            state.epoch + 1,
            spec.epochs,
            state.global_step,
            train_logs.get("train/loss", float("nan")),
            objective.monitor,
            value,
            "  (best)" if better else "",
        )
        state.epoch_sums, state.epoch_seen = {}, 0
        self.validation_seconds += time.perf_counter() - t_val
        self.train_t0 = time.perf_counter()


def fit(
    model: nn.Module,
    objective: Objective,
    train_ds,
    val_ds,
    spec: OptimParams,
    seed: int,
    run_dir: Path,
    digest: str,
    resume: bool = False,
    log_name: str = "train",
    eval_every: int | None = None,
    epoch_samples: int | None = None,
    pool: tuple[int, int] = (0, 0),
) -> FitResult:
    """Train with validation after every epoch, or every ``eval_every`` steps (and after the last step); keep
    the best validated weights by ``objective.monitor``. Each validation is a timeframe (`Objective.end_timeframe`).

    ``run_dir`` holds ``last.pt`` (the resumable checkpoint) and ``dvclive/``; it outlives failed runs.
    ``digest`` identifies everything that determines the result: a checkpoint with another digest is
    never resumed from. ``epoch_samples``: labelled samples an epoch draws (default: one pass over them).
    ``pool`` = (size, per step): the last ``size`` items of ``train_ds`` are unlabelled images, and every step
    adds ``per step`` of them to its ``spec.batch_size`` labelled ones (see `EpochSampler`).
    """
    device = resolve_device(spec.device)
    ddp = init_distributed(device)
    model, channels_last, amp = place(model, spec, device)
    train_sampler, val_sampler, steps_per_epoch = _samplers(train_ds, val_ds, spec, seed, ddp, epoch_samples, pool)
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, spec.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    trainee = Trainee(model, opt, sched, scaler, objective)
    state, best_state = RunState(), copy.deepcopy(unwrap(model).state_dict())
    run_dir = Path(run_dir)
    restored = restore(run_dir, trainee, resume, ddp.main, digest, log_name)
    if restored is not None:
        state, best_state = restored
    resumed_from = state.global_step if restored is not None else None
    if ddp.world > 1:
        dist.barrier()  # nobody starts while rank 0 may still be clearing run_dir
        model = trainee.model = wrap_ddp(model, device)
    run = _Run(
        trainee=trainee,
        state=state,
        best_state=best_state,
        spec=spec,
        ddp=ddp,
        device=device,
        amp=amp,
        channels_last=channels_last,
        val_ds=val_ds,
        val_sampler=val_sampler,
        run_dir=run_dir,
        digest=digest,
        live=open_live(run_dir, state, resumed_from, ddp.main),
        log_name=log_name,
        eval_every=eval_every,
        total_steps=spec.epochs * steps_per_epoch,
    )
    seconds = run.train(train_ds, train_sampler, steps_per_epoch)
    return FitResult(
        run.best_state,
        state.best_metrics,
        state.best_epoch + 1,
        state.history,
        seconds,
        resumed_from,
        run.validation_seconds,
        state.best_step,
    )
