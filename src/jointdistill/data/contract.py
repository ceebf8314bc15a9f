"""The prepared-data contract: reading and checking what `prepare` wrote, without torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jointdistill.errors import DataError

FORMAT_VERSION = 1  # of meta.json
SPLITS = ("train", "val", "test")  # labelled
UNLABELLED = "unlabelled"  # images only: frames with no label of any task; absent from older prepared folders
ARRAYS = {"images": (np.uint8, 4), "labels": (np.uint8, 3), "depth": (np.float32, 3)}
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "jointdistill.checksums/1"
# Not listed in checksums.json: the list itself, and the lineage record (which names the folder by its content).
_UNLISTED = (CHECKSUMS, "lineage.json", "metrics.json", "run.json")  # the last two: see records
META_KEYS = (
    "dataset",
    "classes",
    "palette",
    "ignore_index",
    "depth_unit",
    "depth_range",
    "resolution",
    "normalization",
    "counts",
)


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; is {root} the output of `jointdistill prepare`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt JSON ({exc})") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: missing keys {', '.join(missing)}")
    return meta


def open_split(root: str | Path, split: str, meta: dict | None = None) -> dict[str, np.ndarray]:
    """Memory-map one split's arrays and check them against meta.json."""
    root = Path(root)
    meta = meta or read_meta(root)
    if split not in (*SPLITS, UNLABELLED):
        raise DataError(f"unknown split {split!r} (expected one of {', '.join((*SPLITS, UNLABELLED))})")
    h, w = meta["resolution"]
    n = split_count(meta, split)
    arrays = {}
    for name, (dtype, ndim) in ARRAYS.items():
        if split == UNLABELLED and name != "images":
            continue
        path = root / split / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: missing") from None
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from None
        expected = (n, h, w, 3) if ndim == 4 else (n, h, w)
        if arr.dtype != dtype or arr.shape != expected:
            raise DataError(f"{path}: expected {np.dtype(dtype).name} {expected}, found {arr.dtype.name} {arr.shape}")
        arrays[name] = arr
    return arrays


def split_count(meta: dict, split: str) -> int:
    """Samples in ``split`` (0 for an unlabelled split that a folder prepared before it existed lacks)."""
    return int(meta["counts"].get(split, 0)) if split == UNLABELLED else int(meta["counts"][split])


def sample_digest(image: np.ndarray, label: np.ndarray | None = None, depth: np.ndarray | None = None) -> str:
    """sha256 of a sample's arrays (an unlabelled sample: its image alone)."""
    h = hashlib.sha256()
    for a in (image, label, depth):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_checksums(root: str | Path) -> dict:
    """Record the size and sha256 of every file of a prepared folder in its checksums.json (`prepare` does)."""
    from jointdistill.io import file_sha256, write_json

    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in _UNLISTED
    }
    record = {"format": CHECKSUMS_FORMAT, "files": files}
    write_json(root / CHECKSUMS, record)
    return record


def verify_checksums(root: str | Path) -> None:
    """Check every file against the checksums prepare recorded (size, then sha256; about 1 s per GB): bytes
    changed in place, even at the same size, are one DataError naming the file, before anything reads them."""
    from jointdistill.io import file_sha256

    root = Path(root)
    path = root / CHECKSUMS
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise DataError(
            f"{path}: missing; {root} was prepared by an older jointdistill or copied incompletely "
            "(run `jointdistill prepare` again)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    for rel, want in files.items():
        file = root / rel
        if not file.is_file():
            raise DataError(f"{file}: missing (listed in {CHECKSUMS})")
        if file.stat().st_size != want["bytes"] or file_sha256(file) != want["sha256"]:
            raise DataError(
                f"{file}: its content differs from what prepare recorded in {CHECKSUMS} (corrupted or "
                "changed in place); restore it (`dvc checkout`) or run `jointdistill prepare` again"
            )


def verify_prepared(root: str | Path, check_digests: bool = False, check_files: bool = True) -> dict:
    """Check a prepared folder against the contract; return its meta. Raises DataError on any mismatch.

    ``check_files``: every file against the checksums prepare recorded (cheap); ``check_digests``: also every
    sample against its manifest checksum (slower: it decodes the arrays)."""
    import pandas as pd

    root = Path(root)
    meta = read_meta(root)
    if check_files:
        verify_checksums(root)
    splits = (*SPLITS, UNLABELLED) if split_count(meta, UNLABELLED) else SPLITS
    arrays = {s: open_split(root, s, meta) for s in splits}
    path = root / "manifest.parquet"
    try:
        manifest = pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable ({exc})") from None
    for split in splits:
        rows = manifest[manifest["split"] == split].sort_values("index")
        if len(rows) != split_count(meta, split) or list(rows["index"]) != list(range(len(rows))):
            raise DataError(f"{path}: rows for {split} do not match meta.json counts ({split_count(meta, split)})")
        if check_digests:
            a = arrays[split]
            for i, digest in zip(rows["index"], rows["sha256"]):
                if sample_digest(*(a[k][i] for k in ("images", "labels", "depth") if k in a)) != digest:
                    raise DataError(f"{root / split}: sample {i} does not match its manifest checksum")
    return meta
