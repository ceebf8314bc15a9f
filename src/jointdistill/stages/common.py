"""Not a stage: what the two training stages (`teacher`, `distill`) share, from the run's key to the output.

After training, both evaluate the best weights on test (each rank its shard, reduced), then rank 0 writes the
output folder atomically: the model and the stage's own files, ``report.json`` without the run facts,
``lineage.json``, and beside it ``metrics.json``, ``run.json`` and the dvclive curves (see `records`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch import nn

from jointdistill.io import atomic_dir, write_json
from jointdistill.provenance import lineage, records
from jointdistill.training.engine import compute_metrics
from jointdistill.training.objectives import Objective
from jointdistill.training.sampling import EpochSampler, make_loader


def run_key(inputs: dict) -> str:
    """The key of a training run's checkpoints: everything that decides the run (params, data, code). A
    checkpoint made under another key is not resumed from."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def test_metrics(model: nn.Module, objective: Objective, test_ds, batch_size: int, seed: int, device) -> dict:
    """``objective``'s metrics of ``model`` on the test split, every rank on its shard, reduced across ranks."""
    rank, world = rank_and_world()
    sampler = EpochSampler(len(test_ds), batch_size, seed, False, rank, world, drop_last=False)
    return compute_metrics(
        model.to(device), objective, make_loader(test_ds, sampler, batch_size, 0, device, False), device
    )


def write_output(
    out: Path,
    files: Callable[[Path], None],
    report: dict,
    curated: Callable[[dict], dict],
    record: dict,
    metrics_dir: str | Path | None,
    live: Path,
) -> None:
    """The output folder, atomically: ``files(tmp)`` writes the model and the stage's own files (and may add to
    ``report``), then the report, the lineage ``record`` and the metrics folder (``curated(report)``, the run
    facts, the dvclive curves in ``live``)."""
    with atomic_dir(out) as tmp:
        files(tmp)
        content, run_facts = records.split(report)
        write_json(tmp / records.REPORT, content)
        lineage.write(tmp, record)
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, curated(report), run_facts, live)


def data_record(meta: dict) -> dict:
    """What a model file carries about the data it was trained on."""
    keys = ("classes", "palette", "normalization", "resolution", "ignore_index")
    return {**{k: meta[k] for k in keys}, "data_checksum": meta.get("source_checksum")}


def end_distributed() -> None:
    """Wait for every rank (rank 0 was writing), then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
