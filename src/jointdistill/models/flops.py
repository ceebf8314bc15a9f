"""Forward FLOPs of one image, counted by ``torch.utils.flop_counter`` (a multiply-add counts as 2 FLOPs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_flops(model: nn.Module, height: int, width: int) -> int:
    """FLOPs of one forward pass of ``model`` on one ``height`` × ``width`` image, in eval mode, on the CPU."""
    was = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was)
    return int(counter.get_total_flops())
