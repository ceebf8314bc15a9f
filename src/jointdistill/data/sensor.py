"""Sensor-like training targets for the synthetic source (``prepare.sensor``): the train and val splits' depth and
labels degraded the way a real capture degrades them (a user's val labels come from the same sensor and
annotators), while test stays exact.

Exact synthetic labels are what no real dataset has. Real depth comes from a stereo rig (Cityscapes), a
structured-light sensor (NYUv2) or a LiDAR: its error grows with distance, it has holes, and it is missing
at occlusion edges, where one camera sees what the other does not. Real segmentation labels are polygons drawn
by people: their boundaries wander by a few pixels. A model trained on such targets must learn the clean
function from dirty examples, which is exactly where a teacher's predictions add something that labels do not.

Every degradation is deterministic per (seed, sample id) and happens at the prepared resolution:

- depth noise: log-normal, spatially correlated (cells of 8 px, like a matcher's window), with a relative
  standard deviation of ``depth_noise`` at 50 m growing linearly with distance (stereo: σ_z ∝ z², i.e. σ_z/z ∝ z);
- holes: blobs covering ``depth_holes`` of the valid pixels, plus every pixel within ``edge_holes`` px of a
  depth discontinuity (a jump of more than 15 % between neighbours);
- label jitter: each pixel takes the label at a smoothly varying offset of up to ``label_jitter`` px, so
  boundaries move as a hand-drawn polygon's would, and the interior of regions is untouched.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import ndimage

_CELL = 8  # px: correlation length of the noise fields
_DEPTH_REF = 50.0  # m: the distance at which the depth noise has its nominal relative std
_EDGE_JUMP = 0.15  # relative depth jump between neighbours counted as a discontinuity


def _rng(seed: int, sample_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"sensor:{seed}:{sample_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def smooth_field(rng: np.random.Generator, h: int, w: int, cell: int = _CELL) -> np.ndarray:
    """A zero-mean, unit-std random field, correlated over about ``cell`` pixels (bilinear upsampling)."""
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2))
    field = ndimage.zoom(coarse, cell, order=1)[:h, :w]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def edge_mask(depth: np.ndarray, width: int) -> np.ndarray:
    """Valid pixels within ``width`` px of a depth discontinuity (occlusion edges)."""
    valid = depth > 0
    logd = np.log(np.where(valid, depth, 1.0))
    jump = np.log1p(_EDGE_JUMP)
    edge = np.zeros_like(valid)
    for axis in (0, 1):
        d = np.abs(np.diff(logd, axis=axis)) > jump
        both = np.logical_and(
            np.take(valid, range(1, depth.shape[axis]), axis), np.take(valid, range(depth.shape[axis] - 1), axis)
        )
        d &= both
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge & valid


def degrade(
    depth: np.ndarray,
    label: np.ndarray,
    seed: int,
    sample_id: str,
    depth_noise: float,
    depth_holes: float,
    edge_holes: int,
    label_jitter: int,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (depth, label) as a sensor and an annotator would have given them; inputs are left unchanged."""
    rng = _rng(seed, sample_id)
    h, w = depth.shape
    valid = depth > 0
    out = depth.astype(np.float32, copy=True)
    if depth_noise > 0:
        rel = depth_noise * depth / _DEPTH_REF
        eps = np.sqrt(0.8) * smooth_field(rng, h, w) + np.sqrt(0.2) * rng.standard_normal((h, w))
        out = np.where(valid, depth * np.exp(rel * eps), 0.0).astype(np.float32)
    holes = np.zeros((h, w), bool)
    if depth_holes > 0 and valid.any():
        blobs = smooth_field(rng, h, w, 2 * _CELL)
        holes |= blobs > np.quantile(blobs[valid], 1.0 - depth_holes)
    if edge_holes > 0:
        holes |= edge_mask(depth, edge_holes)
    out[holes] = 0.0
    lab = label
    if label_jitter > 0:
        dy = np.rint(label_jitter * np.clip(smooth_field(rng, h, w) / 2, -1, 1)).astype(np.int64)
        dx = np.rint(label_jitter * np.clip(smooth_field(rng, h, w) / 2, -1, 1)).astype(np.int64)
        yy = np.clip(np.arange(h)[:, None] + dy, 0, h - 1)
        xx = np.clip(np.arange(w)[None, :] + dx, 0, w - 1)
        lab = label[yy, xx]
        # Unlabelled pixels stay unlabelled (they are not an annotator's choice).
        lab = np.where(label == ignore_index, label, lab).astype(label.dtype)
    return out, lab
