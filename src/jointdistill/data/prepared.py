"""A memory-mapped torch Dataset over one split of the `prepare` output."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from jointdistill.data.contract import UNLABELLED, open_split, read_meta
from jointdistill.data.transforms import JointTransform


class PreparedDataset(Dataset):
    """One split of a prepared folder. Items are dicts of tensors:

    ``image`` (3, H, W) float32 normalised with meta's mean/std; ``label`` (H, W) int64 (ignore_index where
    unlabeled); ``depth`` (1, H, W) float32 metres (0 = invalid); ``index`` int. With ``features`` (an array
    (N, C, h, w) of the teachers' cached feature maps for this split), also ``teacher_features`` (C, h', w')
    float32, warped by the same augmentation as the image, and ``feature_scale`` (the zoom it was warped by). With
    ``targets`` (an array (N, K + 1, H, W) of the teachers' cached predictions: K seg logits, then depth), also
    ``target_seg`` (K, H, W) and ``target_depth`` (1, H, W), augmented exactly like the labels and the depth.

    The ``unlabelled`` split has images only: its items carry a label of ignore_index everywhere and no valid
    depth, so the task losses skip them and only the distillation terms read them.

    With a ``transform`` the random augmentation of item i in epoch e is fixed by (seed, e, i), so a run
    resumed mid-training, or spread over several loader workers, sees exactly the same batches.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: JointTransform | None = None,
        seed: int = 0,
        features: np.ndarray | None = None,
        feature_stride: int = 8,
        targets: np.ndarray | None = None,
    ):
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
        self.features, self.feature_stride = features, feature_stride
        if features is not None and len(features) != len(self):
            raise ValueError(f"{split}: {len(features)} cached feature maps for {len(self)} samples")
        self.targets = targets
        if targets is not None and len(targets) != len(self):
            raise ValueError(f"{split}: {len(targets)} cached teacher predictions for {len(self)} samples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.arrays["images"].shape[0])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        image = torch.from_numpy(np.array(self.arrays["images"][i])).permute(2, 0, 1).float().div_(255)
        image = (image - self.mean) / self.std
        if "labels" in self.arrays:
            label = torch.from_numpy(np.array(self.arrays["labels"][i])).long()
            depth = torch.from_numpy(np.array(self.arrays["depth"][i])).unsqueeze(0)
        else:  # the unlabelled split: no label anywhere, no valid depth (the task losses skip such pixels)
            label = torch.full(image.shape[-2:], self.ignore_index, dtype=torch.long)
            depth = torch.zeros(1, *image.shape[-2:])
        item: dict[str, Any] = {"index": i}
        feats = None if self.features is None else torch.from_numpy(np.array(self.features[i]))
        preds = None if self.targets is None else torch.from_numpy(np.array(self.targets[i])).float()
        if preds is not None:
            item["target_seg"], item["target_depth"] = preds[:-1], preds[-1:]
        if self.transform is not None:
            key = f"{self.seed}:{self.epoch}:{i}"
            key = key if self.split != UNLABELLED else f"{UNLABELLED}:{key}"  # its own draws, not train's item i's
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1)
            draw = self.transform.draw(image.shape[1], image.shape[2], g)
            image, label, depth = self.transform.apply(draw, image, label, depth, self.ignore_index)
            if feats is not None:
                feats = self.transform.warp_features(draw, feats, self.feature_stride)
            if preds is not None:  # the predictions go exactly where the labels go
                item["target_seg"], _, item["target_depth"] = self.transform.apply(
                    draw,
                    item["target_seg"],
                    torch.zeros(preds.shape[-2:], dtype=torch.long),
                    item["target_depth"],
                    self.ignore_index,
                )
        if feats is not None:
            item["teacher_features"] = feats.float()
            # The zoom the maps were warped by: a teacher head reading them predicts the un-zoomed depth, which
            # must be divided by it like the depth labels (see DistillModel.forward).
            item["feature_scale"] = torch.tensor(draw.s if self.transform is not None else 1.0, dtype=torch.float32)
        return {"image": image, "label": label, "depth": depth, **item}


def labelled_frames(ds: PreparedDataset) -> dict[str, np.ndarray]:
    """Per task, which frames of ``ds`` carry that task's label (bool per frame): a frame without a seg label is
    ignore_index everywhere, one without depth is 0 everywhere. The unlabelled split has none."""
    n = len(ds)
    if "labels" not in ds.arrays:
        return {"seg": np.zeros(n, bool), "depth": np.zeros(n, bool)}
    seg, depth = np.zeros(n, bool), np.zeros(n, bool)
    for start in range(0, n, 256):  # chunks: a large split is never read into memory at once
        stop = min(n, start + 256)
        seg[start:stop] = (np.asarray(ds.arrays["labels"][start:stop]) != ds.ignore_index).any(axis=(1, 2))
        depth[start:stop] = (np.asarray(ds.arrays["depth"][start:stop]) > 0).any(axis=(1, 2))
    return {"seg": seg, "depth": depth}


class Frames(Dataset):
    """Some frames of a split, in the order of ``ids`` (items keep their split's own ``index``)."""

    def __init__(self, ds: PreparedDataset, ids):
        self.ds, self.ids = ds, [int(i) for i in ids]

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.ds[self.ids[i]]


class TrainingSet(Dataset):
    """Several datasets as one: the student's fully labelled train frames, then its pool (train frames missing a
    task's label, and the unlabelled split). ``set_epoch`` reaches every part."""

    def __init__(self, *parts: Dataset):
        self.parts = parts
        # The parts are sized datasets with set_epoch (PreparedDataset, Frames); torch's Dataset declares neither.
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][i - int(self.offsets[k])]
