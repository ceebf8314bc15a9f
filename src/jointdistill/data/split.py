"""Deterministic splits and label budgets by a seeded hash of the sample id.

Each sample's split depends on its own id and the seed only: adding samples never moves existing ones
between splits, and re-running with the same seed gives the same split on any machine.

The label budget is paid for val too: val is ``val_fraction`` of the frames that carry a label (of any task), as
the paper holds out 15 % of its training data, and the frames with no label at all form the ``unlabelled`` split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

from jointdistill.data.sample import SampleRef

TASK_ORDER = ("seg", "depth")


def hash_fraction(sample_id: str, seed: int, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (sample_id, seed, salt)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def apply_budget(refs: list[SampleRef], budget: Mapping[str, float], seed: int) -> list[SampleRef]:
    """The source's train frames with each task's label kept on a ``budget[task]`` share of them, drawn by the
    seed (the test split keeps every label). One draw per frame decides every task, so the budgets nest: a frame
    labelled for the scarcer task is labelled for the other too, and raising a share only adds labels."""
    out = []
    for ref in refs:
        if ref.source_split == "test":
            out.append(ref)
            continue
        u = hash_fraction(ref.sample_id, seed, "labelled")
        tasks = tuple(t for t in ref.tasks if u < budget.get(t, 1.0))
        out.append(replace(ref, tasks=tasks))
    return out


def assign_splits(refs: list[SampleRef], val_fraction: float, seed: int) -> dict[str, list[SampleRef]]:
    """test = the source's test; of its train frames, those with no label at all are ``unlabelled``, and
    ``val_fraction`` of the labelled ones (by the seed's hash) are val, the rest train."""
    out: dict[str, list[SampleRef]] = {"train": [], "val": [], "test": [], "unlabelled": []}
    for ref in refs:
        if ref.source_split == "test":
            out["test"].append(ref)
        elif not ref.tasks:
            out["unlabelled"].append(ref)
        elif hash_fraction(ref.sample_id, seed, "val") < val_fraction:
            out["val"].append(ref)
        else:
            out["train"].append(ref)
    for split in out.values():
        split.sort(key=lambda r: r.sample_id)
    return out


def labelled_counts(refs: list[SampleRef]) -> dict[str, int]:
    """Frames of ``refs`` with each task's label, and with every task's (``all``)."""
    counts = {t: sum(t in r.tasks for r in refs) for t in TASK_ORDER}
    counts["all"] = sum(all(t in r.tasks for t in TASK_ORDER) for r in refs)
    return counts
