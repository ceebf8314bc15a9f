"""Resizing a sample to the prepared resolution: area-averaged image, nearest labels, nearest-valid depth.

Averaging would invent class ids and blend depth across object boundaries, so labels and depth take one
source pixel each. For depth that pixel is the *valid* one nearest the output pixel's centre among the
source pixels whose centres fall inside its footprint: sparse depth (Cityscapes disparity, Kinect holes)
keeps its measurements when shrunk instead of losing every output pixel whose nearest source pixel
happened to be a hole. Where the nearest pixel is valid the result is exactly plain nearest.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jointdistill.data.sample import Sample


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel centre."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def _footprint(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Per destination index: candidate source indices (dst, k) and their distance to its centre (inf = none).

    Candidates are the source pixels whose centres lie in [i·s, (i+1)·s), s = src/dst; when enlarging
    there may be none, and the nearest pixel alone stands.
    """
    s = src / dst
    i = np.arange(dst)
    lo = np.ceil(i * s - 0.5).astype(np.int64)
    hi = np.minimum(np.ceil((i + 1) * s - 0.5).astype(np.int64), src)
    k = max(1, int((hi - lo).max()))
    idx = lo[:, None] + np.arange(k)[None, :]
    inside = idx < hi[:, None]
    idx = np.where(inside, idx, nearest_indices(src, dst)[:, None])
    dist = np.where(inside, np.abs(idx + 0.5 - (i[:, None] + 0.5) * s), np.inf)
    return idx, dist


def nearest_valid(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``depth`` (0 = invalid) to height×width, taking the nearest valid pixel of each footprint."""
    h, w = depth.shape
    out = depth[np.ix_(nearest_indices(h, height), nearest_indices(w, width))].copy()
    best = np.where(out > 0, -1.0, np.inf)  # a valid nearest pixel is never replaced
    if not np.isinf(best).any():
        return out
    rows, row_dist = _footprint(h, height)
    cols, col_dist = _footprint(w, width)
    for a in range(rows.shape[1]):
        for b in range(cols.shape[1]):
            cand = depth[np.ix_(rows[:, a], cols[:, b])]
            dist = row_dist[:, a, None] ** 2 + col_dist[None, :, b] ** 2
            take = (cand > 0) & (dist < best)
            out[take], best[take] = cand[take], dist[take]
    return out


def resize_sample(sample: Sample, height: int, width: int) -> Sample:
    h, w = sample.label.shape
    if (h, w) == (height, width):
        return sample
    shrink = height <= h and width <= w
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), method))
    rows, cols = nearest_indices(h, height), nearest_indices(w, width)
    return Sample(
        sample.sample_id,
        image,
        sample.label[np.ix_(rows, cols)],
        nearest_valid(sample.depth, height, width),
        sample.extra,
    )
