"""Pictures for people: colourised labels and depth, and the gallery written by `prepare`."""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jointdistill.io import atomic_write_bytes


def colorize_labels(label: np.ndarray, palette, ignore_index: int = 255) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    table[ignore_index] = (0, 0, 0)
    return table[label]


def _turbo_like(x: np.ndarray) -> np.ndarray:
    """A perceptual near-to-far ramp (yellow → red → purple → dark blue) without importing matplotlib."""
    stops = np.array([[252, 253, 191], [252, 137, 97], [183, 55, 121], [81, 18, 124], [0, 0, 4]], np.float32)
    x = np.clip(x, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(np.int64), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def colorize_depth(depth: np.ndarray, max_depth: float, min_depth: float = 2.0) -> np.ndarray:
    """Log-depth ramp from ``min_depth`` (bright) to ``max_depth`` (dark); invalid pixels (0) are black."""
    valid = depth > 0
    x = np.log(np.maximum(depth, min_depth) / min_depth) / np.log(max(max_depth / min_depth, 1.0 + 1e-6))
    rgb = _turbo_like(x)
    rgb[~valid] = 0
    return rgb


def gallery(images, labels, depths, palette, max_depth: float, classes=None) -> Image.Image:
    """Rows of RGB | labels | depth, with a legend of class colours underneath."""
    rows = [
        np.concatenate([im, colorize_labels(lb, palette), colorize_depth(d, max_depth)], axis=1)
        for im, lb, d in zip(images, labels, depths)
    ]
    grid = np.concatenate(rows, axis=0)
    pic = Image.fromarray(grid)
    if classes:
        legend = Image.new("RGB", (pic.width, 18), (255, 255, 255))
        draw = ImageDraw.Draw(legend)
        x = 4
        for name, color in zip(classes, palette):
            draw.rectangle([x, 4, x + 10, 14], fill=tuple(color))
            draw.text((x + 13, 3), name, fill=(0, 0, 0))
            x += 13 + int(draw.textlength(name)) + 10
        out = Image.new("RGB", (pic.width, pic.height + legend.height), (255, 255, 255))
        out.paste(pic, (0, 0))
        out.paste(legend, (0, pic.height))
        pic = out
    return pic


def save_png(pic: Image.Image, path: str | Path) -> None:
    buf = _io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
