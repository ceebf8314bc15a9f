"""Deterministic splits by a seeded hash of the sample id.

Each sample's split depends on its own id and the seed only: adding samples never moves existing ones
between splits, and re-running with the same seed gives the same split on any machine.
"""

from __future__ import annotations

import hashlib

from jointdistill.data.sample import SampleRef


def hash_fraction(sample_id: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (sample_id, seed, salt)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    refs: list[SampleRef], val_fraction: float, seed: int, labelled_fraction: float = 1.0
) -> dict[str, list[SampleRef]]:
    """train/val from the source's train split (val = ``val_fraction`` of it), test = the source's test.

    ``labelled_fraction`` < 1 keeps that share of train labelled, picked by its own hash, and moves the rest to
    ``unlabelled`` (its images only are kept). Val and test do not depend on it: a label budget never changes
    what a model is selected or scored on.
    """
    out: dict[str, list[SampleRef]] = {"train": [], "val": [], "test": [], "unlabelled": []}
    for ref in refs:
        if ref.source_split == "test":
            out["test"].append(ref)
        elif hash_fraction(ref.sample_id, seed, "val") < val_fraction:
            out["val"].append(ref)
        elif labelled_fraction < 1.0 and hash_fraction(ref.sample_id, seed, "labelled") >= labelled_fraction:
            out["unlabelled"].append(ref)
        else:
            out["train"].append(ref)
    for split in out.values():
        split.sort(key=lambda r: r.sample_id)
    return out
