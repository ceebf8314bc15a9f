"""The knowledge trajectory: attention maps, their top-k essential points per probe image and
timeframe, a buffer of the last L timeframes, and the L1 loss that pulls the student's attention towards
the connector's recorded values at those points."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """A(f) = mean over channels of f², L2-normalised over space: (N, C, h, w) → (N, h, w)."""
    a = features.float().pow(2).mean(1)
    norm = a.flatten(1).norm(dim=1).clamp_min(1e-12)
    return a / norm.view(-1, 1, 1)


def resize_attention(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    return F.interpolate(a.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


@dataclass
class Points:
    """Top-k points of one timeframe: (P, k) rows/cols and values for P probe images."""

    timeframe: int
    step: int
    ys: torch.Tensor
    xs: torch.Tensor
    values: torch.Tensor


def top_k_points(a: torch.Tensor, k: int, timeframe: int = 0, step: int = 0) -> Points:
    """The k highest locations of each map (N, h, w); ties go to the earlier location in row-major order."""
    n, h, w = a.shape
    if not 1 <= k <= h * w:
        raise ValueError(f"top_k={k} must be between 1 and the map size {h}×{w}")
    flat = a.detach().flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    return Points(timeframe, step, order // w, order % w, flat.gather(1, order))


class TrajectoryBuffer:
    """The connector's essential points of the last L timeframes: the trajectory the student follows."""

    def __init__(self, length: int):
        if length < 1:
            raise ValueError("trajectory length must be ≥ 1")
        self.frames: deque[Points] = deque(maxlen=length)

    def __len__(self) -> int:
        return len(self.frames)

    def append(self, points: Points) -> None:
        self.frames.append(points)

    def state_dict(self) -> dict:
        return {"frames": [p.__dict__ for p in self.frames], "length": self.frames.maxlen}

    def load_state_dict(self, state: dict) -> None:
        self.frames = deque((Points(**p) for p in state["frames"]), maxlen=state["length"])


def trajectory_loss(
    student_attention: torch.Tensor, buffer: TrajectoryBuffer, images: torch.Tensor | None = None
) -> torch.Tensor:
    """mean over timeframes τ in the buffer, probe images and points j of |A_S(x_τj) − v_τj|.

    ``student_attention``: (P, h, w) on the connector's grid (see `resize_attention`), with gradients.
    ``images``: which of the buffer's probe images the P maps are (indices into the probe set; default all).
    Returns 0 (still attached to the graph) when the buffer is empty.
    """
    if not len(buffer):
        return student_attention.sum() * 0.0
    p, h, w = student_attention.shape
    flat = student_attention.flatten(1)
    losses = []
    for pts in buffer.frames:
        ys, xs, values = pts.ys, pts.xs, pts.values
        if images is not None:
            sel = images.to(ys.device)
            ys, xs, values = ys[sel], xs[sel], values[sel]
        if ys.shape[0] != p:
            raise ValueError(f"buffer holds {ys.shape[0]} probe images, the student batch {p}")
        idx = (ys * w + xs).to(flat.device)
        losses.append((flat.gather(1, idx) - values.to(flat.device, flat.dtype)).abs().mean())
    return torch.stack(losses).mean()


def trajectory_distance(a: Points, b: Points) -> float:
    """L1 distance between two trajectories' values at the same timeframe (mean over images and ranks)."""
    return float((a.values - b.values).abs().mean())


def point_overlap(a: Points, b: Points) -> float:
    """Share of a's essential points that are also among b's (same image), in [0, 1]."""
    shared = 0
    for i in range(a.ys.shape[0]):
        sa = set(zip(a.ys[i].tolist(), a.xs[i].tolist(), strict=True))
        sb = set(zip(b.ys[i].tolist(), b.xs[i].tolist(), strict=True))
        shared += len(sa & sb)
    return shared / max(a.ys.numel(), 1)


def rows(points: Points, source: str, image_ids: list[int] | None = None) -> list[dict]:
    """Rows for trajectory.parquet: timeframe, step, image, rank, y, x, value, source.

    ``image_ids`` names the probe images (e.g. their index in ``val``); default 0..P−1.
    """
    out = []
    p, k = points.ys.shape
    ids = image_ids if image_ids is not None else list(range(p))
    for i in range(p):
        for r in range(k):
            out.append(
                {
                    "timeframe": points.timeframe,
                    "step": points.step,
                    "image": int(ids[i]),
                    "rank": r,
                    "y": int(points.ys[i, r]),
                    "x": int(points.xs[i, r]),
                    "value": float(points.values[i, r]),
                    "source": source,
                }
            )
    return out
