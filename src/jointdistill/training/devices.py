"""Where a network trains: the device, DDP under ``torchrun``, mixed precision, channels_last, torch.compile."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from jointdistill.config import OptimParams
from jointdistill.errors import ModelError
from jointdistill.models.nets import Network


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


def use_compile(spec: OptimParams, device: torch.device) -> bool:
    return spec.compile == "on" or (spec.compile == "auto" and device.type == "cuda")


def amp_dtype(spec: OptimParams, device: torch.device) -> torch.dtype | None:
    if spec.amp == "off" or (spec.amp == "auto" and device.type != "cuda"):
        return None
    if spec.amp == "fp16":
        return torch.float16
    return torch.bfloat16


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def network_of(model: nn.Module) -> Network | None:
    """The trained `Network` (under DDP: the wrapped one), or None for a plain module, which has the defaults."""
    inner = unwrap(model)
    return inner if isinstance(inner, Network) else None


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
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    net = network_of(model)
    targets = net.compile_targets() if net is not None else [unwrap(model)]
    for m in targets:
        m.compile()
    return len(targets)


def place(model: nn.Module, spec: OptimParams, device: torch.device) -> tuple[nn.Module, bool, torch.dtype | None]:
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


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
