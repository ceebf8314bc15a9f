"""The training and evaluation loop shared by the teachers and (later) the student.

Read top to bottom: `train_one_epoch`, `evaluate`, `fit`. A *task* object supplies what differs between
models (its loss, its metrics and the number that selects the best epoch); everything else is here:
optimiser and schedule, AMP, channels_last, torch.compile, gradient clipping, determinism, progress, dvclive logging,
checkpoints and resume, and DDP under ``torchrun``.

Reproducibility contract: for a given seed, the data order of epoch e is a permutation drawn from
(seed, e), item i's augmentation is drawn from (seed, e, i) (see PreparedDataset), and the global RNG
(dropout) is saved in every checkpoint. A run resumed from any checkpoint therefore reaches exactly the
weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from jointdistill.config import OptimParams
from jointdistill.errors import ModelError
from jointdistill.io import atomic_write_text
from jointdistill.models.serialization import load_safe, save_atomic

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "jointdistill.checkpoint/1"


# ----------------------------------------------------------------------------- tasks
class Objective(Protocol):
    """What `fit` needs from an objective (`training.objectives`, `distill.objective`). Optional extras, used when
    present:

    - ``end_timeframe(timeframe, global_step, val_metrics, model) -> dict`` runs after each validation
      (a timeframe: the student's weight update and trajectory recording hook in here); the
      scalars it returns are logged with the epoch;
    - ``state_dict()`` / ``load_state_dict(state)``: the task's own state, saved in every checkpoint and
      restored on resume;
    - ``progress(parts) -> dict[str, str]``: extra fields for the progress bar, from the last step's loss parts.
    """

    monitor: str  # metric that selects the best epoch
    higher_is_better: bool

    # The total and its named parts, 0-d tensors (the engine reads them all at once, once per step).
    def loss(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def new_meters(self) -> Any: ...

    def update(self, meters: Any, outputs: dict, batch: dict) -> None: ...

    def compute(self, meters: Any) -> dict: ...


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec!r} requested but CUDA is not available")
    return device


# ----------------------------------------------------------------------------- data order
class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), sharded across ranks, optionally skipping batches already done.

    Training drops the last incomplete global batch so every rank runs the same number of steps. ``length``
    (default ``n``) is how many indices an epoch draws: more than ``n`` chains further permutations, so a
    smaller dataset can take as many steps per epoch as a larger one (`fit`'s ``epoch_samples``).

    ``pool``/``pool_batch``: the dataset's items ``n .. n + pool - 1`` are an unlabelled pool, and every step
    adds ``pool_batch`` of them (their own chained permutations) to its ``batch_size`` labelled items, so the
    labelled part of a step, and so the weight of the labels, is the same with or without the pool.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        length: int | None = None,
        pool: int = 0,
        pool_batch: int = 0,
    ):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.length = n if length is None else length
        self.pool, self.pool_batch = (pool, pool_batch) if pool and pool_batch else (0, 0)
        self.epoch, self.skip_batches = 0, 0

    @property
    def step_size(self) -> int:
        """Items per step and process: the loader's batch size."""
        return self.batch_size + self.pool_batch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _chain(self, n: int, length: int, salt: int = 0) -> list[int]:
        order: list[int] = []
        for cycle in range(math.ceil(length / n) if n else 0):
            if self.shuffle:  # cycle 0 is the epoch's one permutation whenever length == n
                g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + cycle * 1_000_003 + salt)
                order += torch.randperm(n, generator=g).tolist()
            else:
                order += range(n)
        return order[:length]

    def _indices(self) -> list[int]:
        order = self._chain(self.n, self.length)
        if self.drop_last:
            per_step = self.batch_size * self.world
            order = order[: len(order) // per_step * per_step]
        if not self.pool:
            return order[self.rank :: self.world]
        # Step by step: this rank's share of the step's labelled items, then of its pool items.
        steps = len(order) // (self.batch_size * self.world)
        k, u = self.batch_size * self.world, self.pool_batch * self.world
        pool = [self.n + i for i in self._chain(self.pool, steps * u, salt=7)]
        mixed: list[int] = []
        for s in range(steps):
            mixed += order[s * k : (s + 1) * k][self.rank :: self.world]
            mixed += pool[s * u : (s + 1) * u][self.rank :: self.world]
        return mixed

    def batches_per_epoch(self) -> int:
        n = len(self._indices())
        return n // self.step_size if self.drop_last else math.ceil(n / self.step_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip_batches * self.step_size :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip_batches * self.step_size)


def make_loader(
    ds: Dataset, sampler: EpochSampler, batch_size: int, workers: int, device: torch.device, drop_last: bool
) -> DataLoader:
    """A loader for one pass (made anew each epoch, so nothing in it depends on earlier epochs)."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # The loader draws its workers' base seed from this generator, not from the global RNG, so the
        # global RNG stream (dropout) is the same whether a run started fresh or resumed mid-epoch.
        generator=torch.Generator().manual_seed(sampler.seed * 100_003 + sampler.epoch),
    )


# ----------------------------------------------------------------------------- RNG and checkpoints
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


def use_compile(spec: OptimParams, device: torch.device) -> bool:
    return spec.compile == "on" or (spec.compile == "auto" and device.type == "cuda")


def amp_dtype(spec: OptimParams, device: torch.device) -> torch.dtype | None:
    if spec.amp == "off" or (spec.amp == "auto" and device.type != "cuda"):
        return None
    if spec.amp == "fp16":
        return torch.float16
    return torch.bfloat16


def clip_gradients(model: nn.Module, max_norm: float) -> list[torch.Tensor]:
    """Clip the gradient norm to ``max_norm``, separately per group when the model defines
    ``clip_groups()`` (networks trained side by side with their own objectives, e.g. the student and the
    connector: one's large gradients must not shrink the other's step). Returns the norms before clipping,
    as 0-d tensors on the model's device (reading them would wait for the GPU)."""
    clip_groups = getattr(_unwrap(model), "clip_groups", None)
    groups = clip_groups() if clip_groups is not None else [list(model.parameters())]
    return [torch.nn.utils.clip_grad_norm_(g, max_norm) for g in groups if g]


def compile_networks(model: nn.Module) -> int:
    """``torch.compile`` what ``model.compile_targets()`` names (the encoders and heads of every network: the
    student, teachers held beside it, the connector; the whole model if it names none), in place: that is where
    the FLOPs are. The glue around them (loss, trajectory bookkeeping, Python counters) stays eager, since a
    compiled graph guarding on such Python state would recompile every step. State dict keys are unchanged, so
    checkpoints do not depend on it. Returns the number of modules compiled."""
    import torch._dynamo

    # Every encoder shares one forward function, compiled once per situation: train, eval, no-grad teacher,
    # the trajectory's frozen-BN pass, a last batch of another size, another architecture (6 for one tiny
    # distill run on the CPU). Past dynamo's default of 8 the rest would silently run eager.
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    inner = _unwrap(model)
    compile_targets = getattr(inner, "compile_targets", None)
    targets = compile_targets() if compile_targets is not None else [inner]
    for m in targets:
        m.compile()
    return len(targets)


# ----------------------------------------------------------------------------- loops
def _to(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


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


def train_step(model, task, batch: dict, opt, sched, scaler, spec, amp, where: str = "") -> tuple[float, dict]:
    """One optimisation step on a batch already on the device. Returns the loss and its parts as floats.

    The host waits for the device once per step, after backward and before the optimiser (a task's loss
    parts are 0-d tensors, read together): the forward and backward are queued without a pause, and a
    non-finite loss still stops the run before it changes any weight."""
    with torch.autocast(batch["image"].device.type, dtype=amp, enabled=amp is not None):
        # What else the model takes from the batch (the distill task's cached teacher features).
        outputs = model(batch["image"], **{k: batch[k] for k in getattr(task, "model_inputs", ())})
        loss, parts = task.loss(outputs, batch)
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
    task,
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
        batch = _to(batch, device, channels_last)
        loss, parts = train_step(
            model, task, batch, opt, sched, scaler, spec, amp, f" at epoch {state.epoch + 1}, step {state.global_step}"
        )
        state.step_in_epoch += 1
        state.global_step += 1
        bs = batch["image"].shape[0]
        n_seen += bs
        state.epoch_seen += bs
        for k, v in {"loss": loss, **parts}.items():
            state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v * bs
        bar.update(1)
        if show:
            extra = task.progress(parts) if hasattr(task, "progress") else {}
            bar.set_postfix(loss=f"{loss:.4f}", **extra, img_s=f"{n_seen / (time.perf_counter() - t0):.1f}")
        on_step()
    bar.close()


def interval_logs(state: RunState, train_seconds: float, images: int) -> dict:
    """Mean loss parts since the last validation, and the training throughput over that interval."""
    out = {f"train/{k}": v / max(state.epoch_seen, 1) for k, v in state.epoch_sums.items()}
    out["train/images_per_second"] = images / train_seconds if train_seconds > 0 else 0.0
    return out


@torch.no_grad()
def evaluate(model: nn.Module, task, loader, device: torch.device, amp=None, channels_last=False) -> dict:
    """Exact metrics over the whole split (all ranks' shards reduced)."""
    was_training = model.training
    model.eval()
    meters = task.new_meters()
    for batch in loader:
        batch = _to(batch, device, channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = model(batch["image"])
        task.update(meters, {k: v.float() for k, v in outputs.items()}, batch)
    for m in meters.values() if isinstance(meters, dict) else [meters]:
        m.reduce()
    model.train(was_training)
    return task.compute(meters)


@dataclass
class FitResult:
    best_state: dict
    best_metrics: dict
    best_epoch: int
    history: list
    seconds: float
    resumed_from: int | None
    validation_seconds: float = 0.0  # of ``seconds``, spent in validation and the task's timeframe hook
    best_step: int = 0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


def _place(model: nn.Module, spec: OptimParams, device: torch.device) -> tuple[nn.Module, bool, torch.dtype | None]:
    """The model on ``device``, in channels_last and compiled where ``spec`` says: (model, channels_last, amp)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    channels_last = spec.channels_last == "on" or (spec.channels_last == "auto" and device.type == "cuda")
    amp = amp_dtype(spec, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if use_compile(spec, device):
        compile_networks(model)
    return model, channels_last, amp


def _resume(ckpt_path: Path, digest: str, objects: tuple[Any, ...], log_name: str):
    """Load the last checkpoint into the model, optimiser, schedule, scaler, task and RNG: (run state, best
    weights); or None, with a warning, when it was made with other params, data or code."""
    model, opt, sched, scaler, task = objects
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("digest") != digest:
        log.warning("%s: checkpoint %s was made with other params, data or code; starting afresh", log_name, ckpt_path)
        return None
    _unwrap(model).load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state = RunState(**ckpt["run"])
    if hasattr(task, "load_state_dict") and "task" in ckpt:
        task.load_state_dict(ckpt["task"])
    set_rng_state(ckpt["rng"])
    log.info("%s: resumed from %s at epoch %d, step %d", log_name, ckpt_path, state.epoch + 1, state.global_step)
    return state, ckpt["best_model"]


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _show_progress(main: bool) -> bool:
    """Progress bars on rank 0, unless ``JOINTDISTILL_PROGRESS=off``."""
    return main and os.environ.get("JOINTDISTILL_PROGRESS", "auto") != "off"


def _restore(run_dir: Path, ckpt_path: Path, resume: bool, main: bool, digest: str, *objects, log_name: str):
    """(run state, best weights) from the last checkpoint when resuming from one made with ``digest``, else None.
    ``objects``: model, optimiser, schedule, scaler and task, loaded in place. A fresh run must not inherit an old
    checkpoint or logs: rank 0 removes them, and only them (the folder itself may be one the user chose)."""
    if resume and ckpt_path.exists():
        return _resume(ckpt_path, digest, objects, log_name)
    if not resume and main:
        ckpt_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "dvclive", ignore_errors=True)
    return None


def _open_live(run_dir: Path, state: RunState, resumed_from: int | None, main: bool):
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


def _task_state(task) -> dict:
    """The task's own resumable state (the student's ω, trajectory…), for tasks that have one."""
    return {"task": task.state_dict()} if hasattr(task, "state_dict") else {}


def _is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def _end_timeframe(task, timeframe: int, step: int, val: dict, model: nn.Module) -> dict:
    """What the task's timeframe hook adds to the history row (tasks without one add nothing)."""
    if not hasattr(task, "end_timeframe"):
        return {}
    return task.end_timeframe(timeframe, step, val, model) or {}


def _log_live(live, history: list[dict]) -> None:
    """The last history row to dvclive (rank 0's; other ranks have none), as step len(history) - 1 (right after
    a resume too)."""
    if live is None:
        return
    live.step = len(history) - 1
    for k, v in history[-1].items():
        if k not in ("epoch", "step"):
            live.log_metric(k, v)
    live.next_step()


def _validation_due(step: int, eval_every: int | None, total_steps: int) -> bool:
    """With ``eval_every``, validate every that many steps and after the last one (else once per epoch)."""
    return eval_every is not None and eval_every > 0 and (step % eval_every == 0 or step == total_steps)


def fit(
    model: nn.Module,
    task,
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
    the best validated weights by ``task.monitor``. A validation is a *timeframe* for tasks that have
    ``end_timeframe``.

    ``run_dir`` holds ``last.pt`` (the resumable checkpoint) and ``dvclive/``; it outlives failed runs.
    ``digest`` identifies everything that determines the result: a checkpoint with another digest is
    never resumed from. ``epoch_samples``: labelled samples an epoch draws (default: one pass over them).
    ``pool`` = (size, per step): the last ``size`` items of ``train_ds`` are unlabelled images, and every step
    adds ``per step`` of them to its ``spec.batch_size`` labelled ones (see `EpochSampler`).
    """
    device = resolve_device(spec.device)
    ddp = init_distributed(device)
    model, channels_last, amp = _place(model, spec, device)

    train_sampler = EpochSampler(
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
    val_sampler = EpochSampler(len(val_ds), spec.batch_size, seed, False, ddp.rank, ddp.world, drop_last=False)
    steps_per_epoch = train_sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise ModelError(
            f"train has {len(train_ds) - pool[0]} labelled samples: fewer than one batch of {spec.batch_size} × "
            f"{ddp.world} processes"
        )

    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, spec.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    state = RunState()
    best_state = copy.deepcopy(_unwrap(model).state_dict())
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.pt"
    resumed_from = None

    restored = _restore(
        run_dir, ckpt_path, resume, ddp.main, digest, model, opt, sched, scaler, task, log_name=log_name
    )
    if restored is not None:
        state, best_state = restored
        resumed_from = state.global_step
    if ddp.world > 1:
        dist.barrier()  # nobody starts while rank 0 may still be clearing run_dir
        model = _ddp(model, device)

    live = _open_live(run_dir, state, resumed_from, ddp.main)

    def checkpoint() -> None:
        if not ddp.main:
            return
        save_atomic(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "digest": digest,
                "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "run": state.__dict__,
                "best_model": best_state,
                "rng": rng_state(),
                **_task_state(task),
            },
        )

    show = _show_progress(ddp.main)
    total_steps = spec.epochs * steps_per_epoch
    clock = {"val": 0.0, "train_t0": time.perf_counter(), "images": 0}

    def validate() -> None:
        """Validation = one timeframe: metrics on val, best weights, the task's hook, logs, a checkpoint."""
        nonlocal best_state
        t_val = time.perf_counter()
        train_logs = interval_logs(state, t_val - clock["train_t0"], state.epoch_seen)
        # Evaluate the bare module: DDP's forward is a collective, and ranks' val shards may differ by a batch.
        val_loader = make_loader(val_ds, val_sampler, spec.batch_size, spec.num_workers, device, False)
        val = evaluate(_unwrap(model), task, val_loader, device, amp, channels_last)
        value = val[task.monitor]
        better = _is_better(value, state.best_value, task.higher_is_better)
        if better:
            state.best_value, state.best_epoch, state.best_metrics = value, state.epoch, val
            state.best_step = state.global_step
            best_state = copy.deepcopy(_unwrap(model).state_dict())
        scalars = {k: v for k, v in val.items() if isinstance(v, (int, float))}
        extra = _end_timeframe(task, len(state.history) + 1, state.global_step, val, _unwrap(model))
        state.history.append(
            {
                "epoch": state.epoch + 1,
                "step": state.global_step,
                **train_logs,
                **{f"val/{k}": v for k, v in scalars.items()},
                "lr": sched.get_last_lr()[0],
                **extra,
            }
        )
        _log_live(live, state.history)
        log.info(
            "%s: epoch %d/%d, step %d  loss %.4f  val %s=%.4f%s",
            log_name,
            state.epoch + 1,
            spec.epochs,
            state.global_step,
            train_logs.get("train/loss", float("nan")),
            task.monitor,
            value,
            "  (best)" if better else "",
        )
        state.epoch_sums, state.epoch_seen = {}, 0
        clock["val"] += time.perf_counter() - t_val
        clock["train_t0"] = time.perf_counter()

    def on_step() -> None:
        if _validation_due(state.global_step, eval_every, total_steps):
            validate()
            checkpoint()
        elif state.global_step % spec.checkpoint_every == 0:
            checkpoint()

    t0 = time.perf_counter()
    while state.epoch < spec.epochs:
        train_sampler.set_epoch(state.epoch, skip_batches=state.step_in_epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(state.epoch)
        train_loader = make_loader(train_ds, train_sampler, train_sampler.step_size, spec.num_workers, device, True)
        train_one_epoch(
            model,
            task,
            train_loader,
            opt,
            sched,
            scaler,
            spec,
            device,
            state,
            amp,
            channels_last,
            on_step,
            show,
            steps_per_epoch,
        )
        if not eval_every:
            validate()
        state.epoch += 1
        state.step_in_epoch = 0
        checkpoint()
    if live is not None:
        live.end()
    return FitResult(
        best_state,
        state.best_metrics,
        state.best_epoch + 1,
        state.history,
        time.perf_counter() - t0,
        resumed_from,
        clock["val"],
        state.best_step,
    )
