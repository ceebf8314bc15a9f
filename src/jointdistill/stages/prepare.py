"""The `prepare` stage: any source → the prepared-data contract (meta.json, manifest.parquet, one folder per split).

    prepared/
      meta.json  manifest.parquet  gallery.png
      {train,val,test}/{images,labels,depth}.npy

Samples are streamed one at a time, appended to the .npy files inside a temporary directory (never all
in memory, nor mapped: resident memory stays at about one source frame whatever the dataset's size), which
replaces the output only when everything has been written and checked.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from jointdistill.config import Params
from jointdistill.data.contract import SPLITS, UNLABELLED, sample_digest, write_checksums
from jointdistill.data.resize import resize_sample
from jointdistill.data.sample import Sample, SampleRef, Source
from jointdistill.data.sensor import degrade
from jointdistill.data.sources.registry import make_source
from jointdistill.data.split import apply_budget, assign_splits, labelled_counts
from jointdistill.data.validate import DepthMaskCounts, validate_sample
from jointdistill.errors import DataError
from jointdistill.evaluation.pictures import gallery, save_png
from jointdistill.io import NpyStream, atomic_dir, write_json
from jointdistill.provenance import lineage, records
from jointdistill.stages.results import PrepareResult

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_listing(source: Source, refs: list[SampleRef]) -> None:
    if not refs:
        raise DataError(f"dataset '{source.name}': the source lists no samples")
    seen: set[str] = set()
    for ref in refs:
        if ref.sample_id in seen:
            raise DataError(f"dataset '{source.name}': sample id {ref.sample_id} appears twice")
        seen.add(ref.sample_id)


def _write_split(source, refs, split, tmp, params, stats, progress):
    """Stream one split into its .npy files; return its manifest rows."""
    p = params.prepare
    h, w, n = p.height, p.width, len(refs)
    (tmp / split).mkdir()
    rows = []
    n_classes = len(source.classes)
    # Real targets come from a real sensor already. The labels a user pays for (train and val) come from the same
    # sensor and annotator; test stays exact, the benchmark's measure.
    sensor = p.sensor.enabled and source.name == "synthetic" and split != "test"
    with (
        NpyStream(tmp / split / "images.npy", (n, h, w, 3), np.uint8) as images,
        NpyStream(tmp / split / "labels.npy", (n, h, w), np.uint8) as labels,
        NpyStream(tmp / split / "depth.npy", (n, h, w), np.float32) as depth,
    ):
        for i, ref in enumerate(refs):
            sample = source.load(ref)
            if sample.sample_id != ref.sample_id:
                raise DataError(f"dataset '{source.name}': asked for {ref.sample_id}, got {sample.sample_id}")
            sample, masked = validate_sample(sample, n_classes, source.ignore_index, p.max_depth, p.invalid_depth)
            sample = resize_sample(sample, h, w)
            sample = _keep_labels(sample, ref.tasks, source.ignore_index)
            if sensor:
                sp = p.sensor
                depth_t, label_t = degrade(
                    sample.depth,
                    sample.label,
                    params.seed,
                    sample.sample_id,
                    sp.depth_noise,
                    sp.depth_holes,
                    sp.edge_holes,
                    sp.label_jitter,
                    source.ignore_index,
                )
                sample = replace(sample, depth=depth_t, label=label_t)
            images.append(sample.image)
            labels.append(sample.label)
            depth.append(sample.depth)
            stats["masked"].add(masked)
            counts = np.bincount(sample.label.ravel(), minlength=256)
            stats["class_pixels"][split] += counts[:n_classes]
            stats["ignored_pixels"][split] += int(counts[source.ignore_index])
            valid = sample.depth > 0
            stats["depth_valid"][split] += int(valid.sum())
            if valid.any():
                stats["depth_min"] = min(stats["depth_min"], float(sample.depth[valid].min()))
                stats["depth_max"] = max(stats["depth_max"], float(sample.depth[valid].max()))
            if split == "train":
                px = sample.image.reshape(-1, 3).astype(np.float64) / 255.0
                stats["sum"] += px.sum(0)
                stats["sumsq"] += (px * px).sum(0)
                stats["npx"] += px.shape[0]
            rows.append(
                {
                    "sample_id": ref.sample_id,
                    "split": split,
                    "index": i,
                    "source_split": ref.source_split,
                    "source_paths": "|".join(ref.paths),
                    "sha256": sample_digest(sample.image, sample.label, sample.depth),
                }
            )
            progress.update(1)
    return rows


def _keep_labels(sample: Sample, tasks: tuple[str, ...], ignore_index: int) -> Sample:
    """The sample with only ``tasks``' labels: no seg label is a frame of ignore_index, no depth a frame of 0."""
    if "seg" not in tasks:
        sample = replace(sample, label=np.full_like(sample.label, ignore_index))
    if "depth" not in tasks:
        sample = replace(sample, depth=np.zeros_like(sample.depth))
    return sample


def _write_unlabelled(source, refs, tmp, params, progress):
    """The unlabelled split: each sample checked like any other, then its image alone is kept."""
    p = params.prepare
    (tmp / UNLABELLED).mkdir()
    rows = []
    with NpyStream(tmp / UNLABELLED / "images.npy", (len(refs), p.height, p.width, 3), np.uint8) as images:
        for i, ref in enumerate(refs):
            sample = source.load(ref)
            if sample.sample_id != ref.sample_id:
                raise DataError(f"dataset '{source.name}': asked for {ref.sample_id}, got {sample.sample_id}")
            sample, _ = validate_sample(sample, len(source.classes), source.ignore_index, p.max_depth, p.invalid_depth)
            sample = resize_sample(sample, p.height, p.width)
            images.append(sample.image)
            rows.append(
                {
                    "sample_id": ref.sample_id,
                    "split": UNLABELLED,
                    "index": i,
                    "source_split": ref.source_split,
                    "source_paths": "|".join(ref.paths),
                    "sha256": sample_digest(sample.image),
                }
            )
            progress.update(1)
    return rows


def run(
    params: Params,
    out: str | Path,
    data_lineage: dict | None = None,
    metrics_dir: str | Path | None = None,
    params_digest: str | None = None,
) -> PrepareResult:
    """Prepare the configured source into ``out``; metrics.json (split sizes) and run.json (time, machine) go to
    ``metrics_dir`` (default: ``out``). Returns meta.json's content.

    ``data_lineage``: what the source is (e.g. a DVC-pinned fetch's provenance) for ``lineage.json``; by default
    the embedded generator, or ``prepare.root`` looked up in its DVC project. ``params_digest``: the params digest
    to record, when it is not these params' own (a pinned fetch points ``prepare.root`` at a folder of the run)."""
    params_digest = params_digest or params.digest("prepare")
    t0 = time.perf_counter()
    p = params.prepare
    source = make_source(p, params.seed)
    refs = source.list()
    _check_listing(source, refs)
    splits = _assign(source, refs, p, params.seed)
    stats = _new_stats(len(source.classes))
    stats["labelled"] = {s: labelled_counts(splits[s]) for s in SPLITS}
    with atomic_dir(out) as tmp:
        rows = []
        with tqdm(total=len(refs), desc=f"prepare {source.name}", unit="frame", disable=None) as bar:
            for split in SPLITS:
                rows += _write_split(source, splits[split], split, tmp, params, stats, bar)
            if splits[UNLABELLED]:
                rows += _write_unlabelled(source, splits[UNLABELLED], tmp, params, bar)
        checksum = _write_manifest(rows, tmp / "manifest.parquet")
        meta = PrepareResult.from_run(
            params, source, splits, stats, _normalization(p.normalization, stats), checksum, params_digest
        )
        write_json(tmp / "meta.json", meta)
        data = data_lineage or lineage.local_data(None if p.dataset == "synthetic" else p.root)
        lineage.write(tmp, lineage.record("prepare", params_digest, data=data, module=__name__))
        if p.gallery_images:
            _write_gallery(tmp, p.gallery_images, source, p.max_depth)
        write_checksums(tmp)  # last: every later stage checks the files against it before reading them
        seconds = time.perf_counter() - t0
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, dict(meta["counts"]), {"seconds": round(seconds, 2)})
    log.info("prepared %s in %.1fs → %s", meta.headline(), seconds, out)
    return meta


def _assign(source: Source, refs: list[SampleRef], p, seed: int) -> dict[str, list[SampleRef]]:
    """Every sample's split. The synthetic benchmark first draws its label budget; a real source keeps every label
    it has, and its raw frames (no label of any task) form the unlabelled split. An empty split is an error."""
    if source.name == "synthetic":
        refs = apply_budget(refs, p.budget.model_dump(), seed)
    splits = assign_splits(refs, p.val_fraction, seed)
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        sizes = ", ".join(f"{s}={len(splits[s])}" for s in SPLITS)
        raise DataError(
            f"dataset '{source.name}': split {'/'.join(empty)} would be empty ({sizes} of {len(refs)} samples); "
            "use more samples, a larger label budget or a smaller val_fraction"
        )
    for task in ("seg", "depth"):
        if not any(task in r.tasks for r in splits["train"]):
            raise DataError(
                f"dataset '{source.name}': no train frame has a {task} label, so its teacher has nothing to learn "
                f"from ({len(splits['train'])} train frames); label more frames or raise prepare.budget.{task}"
            )
    return splits


def _new_stats(n_classes: int) -> dict[str, Any]:
    """What writing the splits counts (pixels per class, depth coverage, the image moments)."""
    return {
        "masked": DepthMaskCounts(),
        "class_pixels": {s: np.zeros(n_classes, np.int64) for s in SPLITS},
        "ignored_pixels": dict.fromkeys(SPLITS, 0),
        "depth_valid": dict.fromkeys(SPLITS, 0),
        "depth_min": float("inf"),
        "depth_max": 0.0,
        "sum": np.zeros(3),
        "sumsq": np.zeros(3),
        "npx": 0,
    }


def _write_manifest(rows: list[dict], path: Path) -> str:
    """manifest.parquet; returns the checksum over every sample's content. Through pyarrow without pandas'
    schema metadata: the file's bytes (and so DVC's hash) must not depend on which pandas wrote it."""
    manifest = pd.DataFrame(rows)
    table = pa.Table.from_pandas(manifest, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, path)
    return _manifest_digest(manifest)


def _normalization(kind: str, stats: dict) -> dict:
    """The input normalisation: the train images' own mean and std, or ImageNet's."""
    if kind == "dataset":
        mean = stats["sum"] / stats["npx"]
        std = np.sqrt(np.maximum(stats["sumsq"] / stats["npx"] - mean**2, 1e-12))
        return {"kind": "dataset", "mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
    return {"kind": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _write_gallery(tmp: Path, k: int, source: Source, max_depth: float) -> None:
    arrays = {a: np.load(tmp / "train" / f"{a}.npy", mmap_mode="r")[:k] for a in ("images", "labels", "depth")}
    pic = gallery(arrays["images"], arrays["labels"], arrays["depth"], source.palette, max_depth, source.classes)
    save_png(pic, tmp / "gallery.png")


def _manifest_digest(manifest: pd.DataFrame) -> str:
    """One checksum over every sample's content, in split order."""
    h = hashlib.sha256()
    for sid, digest in zip(manifest["sample_id"], manifest["sha256"]):
        h.update(f"{sid}:{digest}\n".encode())
    return h.hexdigest()


def run_from_source(params: Params, source: str | Path, data_lineage: dict | None, out: str | Path) -> PrepareResult:
    """Prepare from a fetched source folder (a KFP ``Dataset`` of the `source` step). By the lineage's kind:
    ``synthetic`` → the embedded generator as configured; a folder that is already a prepared dataset (pinned
    ``data/prepared``) → checked against its manifest checksums and passed on; anything else → the raw dataset
    ``prepare.dataset`` reads, with ``prepare.root`` pointed at it. Returns meta.json's content."""
    import shutil

    from jointdistill.data.contract import verify_prepared

    source = Path(source)
    if not data_lineage or data_lineage.get("kind") == "synthetic":
        return run(params, out, data_lineage)
    if (source / "meta.json").is_file():
        meta = verify_prepared(source, check_digests=True)
        with atomic_dir(out) as tmp:
            for item in source.iterdir():
                if item.name == lineage.LINEAGE:
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            lineage.write(tmp, lineage.record("prepare", params.digest("prepare"), data=data_lineage, module=__name__))
            write_checksums(tmp)
        return PrepareResult(meta)
    if params.prepare.dataset == "synthetic":
        raise DataError(
            f"{source}: a pinned raw dataset needs prepare.dataset set to its format "
            "(folder, nyuv2 or cityscapes), not 'synthetic'"
        )
    # prepare.root points at the folder the source step fetched, a path of this run: the digest is the user's.
    pinned = params.model_copy(update={"prepare": params.prepare.model_copy(update={"root": str(source)})})
    return run(pinned, out, data_lineage, params_digest=params.digest("prepare"))
