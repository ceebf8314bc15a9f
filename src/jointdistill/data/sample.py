"""The dataset interface every source implements, so that a real dataset plugs in as one module.

A source lists its samples cheaply (ids, its own split, where they come from) and loads one sample on
demand; ``prepare`` decides splits from the listing alone and streams the loads into the output arrays,
so memory stays bounded by one sample whatever the dataset's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

SourceSplit = Literal["train", "test"]


@dataclass(frozen=True)
class SampleRef:
    """One sample as the source lists it, before any pixels are read."""

    sample_id: str
    source_split: str  # the source's own split (a SourceSplit): "train" feeds train/val, "test" becomes test
    paths: tuple[str, ...] = ()  # source files (or a generator URI), recorded in the manifest
    # The tasks the source has a label of for this frame: a raw frame has none (it joins the unlabelled split), a
    # Cityscapes train_extra frame has depth alone. `load` returns an empty label / zero depth for the others.
    tasks: tuple[str, ...] = ("seg", "depth")


@dataclass
class Sample:
    """One loaded sample, in the source's native resolution."""

    sample_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) integer class ids; ignore_index where unlabeled
    depth: np.ndarray  # (H, W) float metres; 0 where invalid
    extra: dict = field(default_factory=dict)


class Source(Protocol):
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int

    def list(self) -> list[SampleRef]: ...

    def load(self, ref: SampleRef) -> Sample: ...

    def describe(self) -> dict:
        """What identifies this source's content (versions, checksums) for meta.json."""
        ...
