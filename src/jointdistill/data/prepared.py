"""Reading the `prepare` output (DESIGN §3): the contract check and a memory-mapped torch Dataset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .transforms import JointTransform

SPLITS = ("train", "val", "test")
ARRAYS = {"images": (np.uint8, 4), "labels": (np.uint8, 3), "depth": (np.float32, 3)}
META_KEYS = (
    "dataset", "classes", "palette", "ignore_index", "depth_unit", "depth_range", "resolution",
    "normalization", "counts",
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
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    h, w = meta["resolution"]
    n = meta["counts"][split]
    arrays = {}
    for name, (dtype, ndim) in ARRAYS.items():
        path = root / split / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: missing") from None
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from None
        expected = (n, h, w, 3) if ndim == 4 else (n, h, w)
        if arr.dtype != dtype or arr.shape != expected:
            raise DataError(
                f"{path}: expected {np.dtype(dtype).name} {expected}, found {arr.dtype.name} {arr.shape}"
            )
        arrays[name] = arr
    return arrays


def sample_digest(image: np.ndarray, label: np.ndarray, depth: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (image, label, depth):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class PreparedDataset(Dataset):
    """One split of a prepared folder. Items are dicts of tensors:

    ``image`` (3, H, W) float32 normalised with meta's mean/std; ``label`` (H, W) int64 (ignore_index where
    unlabeled); ``depth`` (1, H, W) float32 metres (0 = invalid); ``index`` int.

    With a ``transform`` the random augmentation of item i in epoch e is fixed by (seed, e, i), so a run
    resumed mid-training, or spread over several loader workers, sees exactly the same batches.
    """

    def __init__(self, root: str | Path, split: str, transform: JointTransform | None = None, seed: int = 0):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.split = split
        self.arrays = open_split(self.root, split, self.meta)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        norm = self.meta["normalization"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(norm["std"], dtype=torch.float32).view(3, 1, 1)
        self.ignore_index = int(self.meta["ignore_index"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.arrays["labels"].shape[0])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        image = torch.from_numpy(np.array(self.arrays["images"][i])).permute(2, 0, 1).float().div_(255)
        image = (image - self.mean) / self.std
        label = torch.from_numpy(np.array(self.arrays["labels"][i])).long()
        depth = torch.from_numpy(np.array(self.arrays["depth"][i])).unsqueeze(0)
        if self.transform is not None:
            g = torch.Generator().manual_seed(
                int.from_bytes(hashlib.sha256(f"{self.seed}:{self.epoch}:{i}".encode()).digest()[:8], "big") >> 1
            )
            image, label, depth = self.transform(image, label, depth, g, self.ignore_index)
        return {"image": image, "label": label, "depth": depth, "index": i}


def verify_prepared(root: str | Path, check_digests: bool = False) -> dict:
    """Check a prepared folder against the contract; return its meta. Raises DataError on any mismatch."""
    import pandas as pd

    root = Path(root)
    meta = read_meta(root)
    arrays = {s: open_split(root, s, meta) for s in SPLITS}
    path = root / "manifest.parquet"
    try:
        manifest = pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: unreadable ({exc})") from None
    for split in SPLITS:
        rows = manifest[manifest["split"] == split].sort_values("index")
        if len(rows) != meta["counts"][split] or list(rows["index"]) != list(range(len(rows))):
            raise DataError(f"{path}: rows for {split} do not match meta.json counts ({meta['counts'][split]})")
        if check_digests:
            a = arrays[split]
            for i, digest in zip(rows["index"], rows["sha256"]):
                if sample_digest(a["images"][i], a["labels"][i], a["depth"][i]) != digest:
                    raise DataError(f"{root / split}: sample {i} does not match its manifest checksum")
    return meta
