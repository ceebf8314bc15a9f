"""Figures for the evaluation report and the ablation (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io as _io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in containers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jointdistill.evaluation.pictures import colorize_depth, colorize_labels  # noqa: E402
from jointdistill.io import atomic_write_bytes  # noqa: E402

DPI = 110


def _save(fig, path: str | Path) -> Path:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def qualitative_grid(
    images, gt_seg, pred_seg, gt_depth, pred_depth, palette, max_depth: float, path: str | Path, ignore_index: int = 255
) -> Path:
    """Rows: image | GT seg | student seg | GT depth | student depth | |error| (metres, invalid = black)."""
    n = len(images)
    titles = ("image", "ground-truth seg", "student seg", "ground-truth depth", "student depth", "depth |error| (m)")
    fig, axes = plt.subplots(n, 6, figsize=(6 * 2.6, n * 1.45 + 0.4), squeeze=False)
    err_max = max(
        1.0,
        float(
            np.percentile([np.abs(p - g)[g > 0].max(initial=0) for p, g in zip(pred_depth, gt_depth, strict=True)], 90)
        ),
    )
    for r in range(n):
        err = np.where(gt_depth[r] > 0, np.abs(pred_depth[r] - gt_depth[r]), np.nan)
        panels = (
            images[r],
            colorize_labels(gt_seg[r], palette, ignore_index),
            colorize_labels(pred_seg[r], palette),
            colorize_depth(gt_depth[r], max_depth),
            colorize_depth(pred_depth[r], max_depth),
            None,
        )
        for c, ax in enumerate(axes[r]):
            if c == 5:
                im = ax.imshow(err, cmap="magma", vmin=0, vmax=err_max)
                ax.set_facecolor("black")
            else:
                ax.imshow(panels[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.colorbar(im, ax=axes[:, 5].tolist(), fraction=0.05, pad=0.02, label="m")
    return _save(fig, path)


def confusion_matrix(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "student") -> Path:
    """Row-normalised (recall per ground-truth class), with the share printed in each cell."""
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.55 * len(classes)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{share[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"confusion matrix ({title}, rows sum to 1)", fontsize=9)
    return _save(fig, path)


def _present(rows: list[dict], key: str) -> list[dict]:
    return [r for r in rows if str(r.get(key, "")) not in ("", "nan", "None")]


def teacher_weights(rows: list[dict], path: str | Path) -> Path:
    """ω, the feedback and (noise-scaled rules) its noise band per task over timeframes (rows of weights.csv)."""
    noisy = bool(_present(rows, "noise"))
    fig, axes = plt.subplots(1, 3 if noisy else 2, figsize=(13.5 if noisy else 9, 3.2))
    ax_w, ax_a = axes[0], axes[1]
    tasks = sorted({r["task"] for r in rows})
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        ax_w.plot([int(r["timeframe"]) for r in mine], [float(r["omega"]) for r in mine], marker="o", label=task)
        fb = _present(mine, "feedback")
        line = ax_a.plot([int(r["timeframe"]) for r in fb], [float(r["feedback"]) for r in fb], marker="o", label=task)
        if noisy:
            nz = _present(fb, "noise")
            t = [int(r["timeframe"]) for r in nz]
            f, n = np.array([float(r["feedback"]) for r in nz]), np.array([float(r["noise"]) for r in nz])
            ax_a.fill_between(t, f - n, f + n, color=line[0].get_color(), alpha=0.2)
            z = _present(mine, "z")
            axes[2].plot([int(r["timeframe"]) for r in z], [float(r["z"]) for r in z], marker="o", label=task)
    ax_w.set_title("teacher weight ω", fontsize=9)
    if noisy:
        ax_a.set_title("feedback s (val) ± its noise σ", fontsize=9)
        axes[2].set_title("z = s / σ per task (ω follows the tasks' difference)", fontsize=9)
    else:
        ax_a.set_title("feedback a = student / teacher (val)", fontsize=9)
        ax_a.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("timeframe (epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def trajectory(image: np.ndarray, points, grid: tuple[int, int], path: str | Path, max_panels: int = 6) -> Path:
    """Essential points of the connector (○) and the student (×) on one probe image, one panel per timeframe.

    ``points``: rows of trajectory.parquet for that image (a pandas DataFrame)."""
    timeframes = sorted(points["timeframe"].unique())
    if len(timeframes) > max_panels:  # first, last and evenly spaced ones between
        pick = np.linspace(0, len(timeframes) - 1, max_panels).round().astype(int)
        timeframes = [timeframes[i] for i in sorted(set(pick))]
    h, w = image.shape[:2]
    sy, sx = h / grid[0], w / grid[1]
    fig, axes = plt.subplots(1, len(timeframes), figsize=(3.0 * len(timeframes), 1.9), squeeze=False)
    for ax, tf in zip(axes[0], timeframes, strict=True):
        ax.imshow(image)
        for source, style in (
            ("connector", {"marker": "o", "facecolors": "none", "edgecolors": "cyan"}),
            ("student", {"marker": "x", "c": "red"}),
        ):
            pts = points[(points["timeframe"] == tf) & (points["source"] == source)]
            if len(pts):
                ax.scatter((pts["x"] + 0.5) * sx, (pts["y"] + 0.5) * sy, s=30, linewidths=1.2, label=source, **style)
        ax.set_title(f"timeframe {tf}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def per_class_iou(values: dict[str, list], classes: list[str], path: str | Path) -> Path:
    """Grouped bars: IoU per class for each model."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(classes), 3.0))
    width = 0.8 / max(len(values), 1)
    for i, (name, ious) in enumerate(values.items()):
        ys = [v if v is not None else 0.0 for v in ious]
        ax.bar(np.arange(len(classes)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (test)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def depth_error_by_distance(series: dict[str, list[dict]], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, rows in series.items():
        ax.plot([r["distance_m"] for r in rows], [r["abs_err"] for r in rows], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("ground-truth distance (m)")
    ax.set_ylabel("AbsErr (m)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def ablation_bars(table: list[dict], metrics: list[str], path: str | Path) -> Path:
    """One panel per metric: mean ± std over seeds for each mode (rows of the ablation table)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.0), squeeze=False)
    modes = [r["mode"] for r in table]
    for ax, key in zip(axes[0], metrics, strict=True):
        means = [r.get(f"{key}_mean") for r in table]
        stds = [r.get(f"{key}_std") or 0.0 for r in table]
        xs = [i for i, m in enumerate(means) if m is not None]
        ax.bar(xs, [means[i] for i in xs], yerr=[stds[i] for i in xs], capsize=3, color=[f"C{i}" for i in xs])
        ax.set_xticks(range(len(modes)), modes, rotation=40, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def paired_differences(pairs: list[dict], metrics: list[str], path: str | Path) -> Path:
    """One panel per metric: each pair's mean paired difference with its 95 % interval (0 marked)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 + 0.45 * len(pairs)), squeeze=False)
    names = [f"{p['a']} − {p['b']}" for p in pairs]
    for ax, key in zip(axes[0], metrics, strict=True):
        scale = 100.0 if key == "miou" else 1.0
        ys = list(range(len(pairs)))[::-1]
        means = [scale * p[key]["mean"] for p in pairs]
        # One seed has no interval: its point is drawn without a bar.
        err = [
            [scale * (p[key]["mean"] - p[key]["low"]) if p[key]["low"] is not None else 0.0 for p in pairs],
            [scale * (p[key]["high"] - p[key]["mean"]) if p[key]["high"] is not None else 0.0 for p in pairs],
        ]
        ax.errorbar(means, ys, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(ys, names if key == metrics[0] else [""] * len(names), fontsize=8)
        ax.set_title({"miou": "mIoU (points)", "abs_err": "AbsErr (m)", "delta_m": "Δm %"}.get(key, key), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
