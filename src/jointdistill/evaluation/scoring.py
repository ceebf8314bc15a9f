"""Evaluating trained models on a split, and the multi-task score Δm.

Δm = (1/K)·Σ_k (−1)^{l_k}·(M_k − M_ref,k) / M_ref,k · 100 over K metrics, l_k = 1 where lower is better:
positive means the model beats the reference on average (in % of the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from jointdistill.evaluation.metrics import HIGHER_IS_BETTER, ConfusionMatrix, DepthMeter, class_ids


class BatchRunner(Protocol):
    """What `score_session` runs: an exported model (`serving.infer.StudentSession`) or anything alike."""

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


DELTA_M_METRICS = ("miou", "pixacc", "abs_err", "rel_err")


def delta_m(metrics: dict, reference: dict, keys=DELTA_M_METRICS) -> float:
    """Δm in percent of ``metrics`` against ``reference`` over ``keys`` (both dicts hold every key)."""
    missing = [k for k in keys if k not in metrics or k not in reference]
    if missing:
        raise KeyError(f"Δm needs {list(keys)}; missing {missing}")
    terms = []
    for k in keys:
        ref = float(reference[k])
        if ref == 0:
            raise ValueError(f"Δm: the reference's {k} is 0; the relative difference is undefined")
        sign = 1.0 if HIGHER_IS_BETTER[k] else -1.0
        terms.append(sign * (float(metrics[k]) - ref) / ref)
    return 100.0 * sum(terms) / len(terms)


@dataclass
class DepthBins:
    """Depth error against ground-truth distance: AbsErr and RelErr per distance bin."""

    edges: np.ndarray
    abs_sum: np.ndarray = field(init=False)
    rel_sum: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self):
        n = len(self.edges) - 1
        self.abs_sum, self.rel_sum, self.count = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        p, g = pred.detach().reshape(-1).double().cpu().numpy(), gt.reshape(-1).double().cpu().numpy()
        valid = g > 0
        p, g = p[valid], g[valid]
        idx = np.clip(np.searchsorted(self.edges, g, side="right") - 1, 0, len(self.edges) - 2)
        err = np.abs(p - g)
        self.abs_sum += np.bincount(idx, err, len(self.count))
        self.rel_sum += np.bincount(idx, err / g, len(self.count))
        self.count += np.bincount(idx, minlength=len(self.count))

    def rows(self) -> list[dict]:
        out = []
        for i, n in enumerate(self.count):
            if n:
                out.append(
                    {
                        "distance_m": round(float((self.edges[i] + self.edges[i + 1]) / 2), 3),
                        "from_m": float(self.edges[i]),
                        "to_m": float(self.edges[i + 1]),
                        "pixels": int(n),
                        "abs_err": float(self.abs_sum[i] / n),
                        "rel_err": float(self.rel_sum[i] / n),
                    }
                )
        return out


def depth_edges(min_depth: float, max_depth: float, bins: int) -> np.ndarray:
    """Log-spaced bin edges: near pixels are many and small errors matter there."""
    lo = max(min_depth, 1e-3)
    return np.geomspace(lo, max(max_depth, lo * 1.01), bins + 1)


@dataclass
class Evaluation:
    metrics: dict
    confusion: np.ndarray | None
    depth_bins: list[dict] | None
    samples: dict  # the first ``keep`` images' predictions, for pictures


@torch.no_grad()
def score_model(
    model: nn.Module,
    tasks: tuple[str, ...],
    dataset,
    num_classes: int,
    ignore_index: int,
    batch_size: int,
    device: torch.device,
    edges: np.ndarray | None = None,
    keep: int = 0,
) -> Evaluation:
    """Exact metrics of ``model`` on ``dataset`` for ``tasks``; plus the confusion matrix, depth error per
    distance bin, and the predictions of the first ``keep`` items."""
    model = model.to(device).eval()
    cm = ConfusionMatrix(num_classes, ignore_index) if "seg" in tasks else None
    dm = DepthMeter() if "depth" in tasks else None
    bins = DepthBins(edges) if "depth" in tasks and edges is not None else None
    samples: dict = {"seg": [], "depth": []}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([it["image"] for it in items]).to(device)
        out = model(x)
        if cm is not None:
            label = torch.stack([it["label"] for it in items])
            cm.update(out["seg"].float().cpu(), label)
        if dm is not None:
            depth = torch.stack([it["depth"] for it in items])
            pred = out["depth"].float().cpu()
            dm.update(pred, depth)
            if bins is not None:
                bins.update(pred, depth)
        room = keep - start
        if room > 0:
            if "seg" in tasks:
                samples["seg"].extend(class_ids(out["seg"]).cpu().numpy().astype(np.uint8)[:room])
            if "depth" in tasks:
                samples["depth"].extend(out["depth"][:, 0].float().cpu().numpy()[:room])
    metrics = {}
    if cm is not None:
        metrics.update(cm.compute())
    if dm is not None:
        metrics.update(dm.compute())
    return Evaluation(metrics, cm.mat.numpy() if cm is not None else None, bins.rows() if bins else None, samples)


def score_session(session: BatchRunner, dataset, batch_size: int, num_classes: int, ignore_index: int) -> dict:
    """Exact test-set metrics (the same accumulation as the PyTorch evaluation) of an onnxruntime session."""
    cm, dm = ConfusionMatrix(num_classes, ignore_index), DepthMeter()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        seg, depth = session.run(torch.stack([it["image"] for it in items]).numpy())
        cm.update(torch.from_numpy(seg), torch.stack([it["label"] for it in items]))
        dm.update(torch.from_numpy(depth), torch.stack([it["depth"] for it in items]))
    metrics = {**cm.compute(), **dm.compute()}
    metrics.pop("per_class_iou")
    return metrics
