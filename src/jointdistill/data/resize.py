"""Resizing a sample to the prepared resolution: area-averaged image, nearest labels and depth (averaging
would invent class ids and blend depth across object boundaries)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import Sample


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel centre."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


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
        sample.depth[np.ix_(rows, cols)],
        sample.extra,
    )
