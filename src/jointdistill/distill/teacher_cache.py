"""The teacher-output cache (``distill.teacher_cache``): the frozen teachers run once over train and val (and the
unlabelled split, where there is one), and what distillation reads from them — their encoder feature maps, which
the connector fuses — is stored as float16 ``.npy`` arrays that training memory-maps. Distillation then never runs
a teacher per step; the loader warps each cached map with the sample's augmentation
(`JointTransform.warp_features`).

The teachers' own predictions are stored too, at full resolution (``distill.kd_target: teachers``). Predictions
made from warped stride-8 maps are not the teachers' predictions: they are blurred, and on the default preset less
accurate than the student trained alone (docs/method.md, Evidence). The loader
warps the stored predictions with the sample's augmentation exactly as it warps the labels (bilinear logits;
nearest depth, divided by the zoom), so the soft targets stay the teachers' own.

A cache is reused when its key — the teachers' file digests, the prepared data's checksum and this format —
matches, and rebuilt (atomically) otherwise.

    teacher_cache/
      meta.json                          key, channels per teacher, grid, stride, counts, build time
      train.npy  val.npy                 (N, C_seg + C_depth, ⌈H/8⌉, ⌈W/8⌉) float16 feature maps
      train_targets.npy val_targets.npy  (N, K + 1, H, W) float16: the seg teacher's K logits, the depth teacher's
                                         depth (metres), in the split's sample order
      unlabelled.npy  unlabelled_targets.npy  the same for the unlabelled split, where the data has one
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointdistill.data.contract import UNLABELLED, split_count
from jointdistill.data.prepared import PreparedDataset
from jointdistill.io import NpyStream, atomic_dir, write_json
from jointdistill.models import MultiHeadNet

log = logging.getLogger(__name__)
FORMAT = "jointdistill.teacher-cache/2"
SPLITS = ("train", "val")
_FP16_MAX = float(np.finfo(np.float16).max)


def cache_key(teacher_digests: dict[str, str], meta: dict) -> dict:
    """What a cache depends on; its ``splits``: train, val, and the unlabelled split where the data has one."""
    splits = [*SPLITS, UNLABELLED] if split_count(meta, UNLABELLED) else list(SPLITS)
    return {
        "format": FORMAT,
        "teachers": dict(teacher_digests),
        "data_checksum": meta.get("source_checksum"),
        "resolution": list(meta["resolution"]),
        "splits": splits,
    }


def open_cache(folder: Path, key: dict) -> dict | None:
    """The cache's arrays (memory-mapped) and meta, or None when it is missing, stale or damaged."""
    try:
        info = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("key") != key:
        return None
    arrays = {}
    for split in key["splits"]:
        for name in (split, f"{split}_targets"):
            try:
                arr = np.load(folder / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError):
                return None
            if arr.dtype != np.float16 or list(arr.shape) != info["shapes"][name]:
                return None
            arrays[name] = arr
    return {"meta": info, **arrays}


@torch.no_grad()
def build(
    folder: Path, teachers: list[MultiHeadNet], key: dict, data: Path, device: torch.device, batch_size: int
) -> dict:
    """Run ``teachers`` once over train and val of ``data`` into ``folder`` (replaced atomically)."""
    t0 = time.perf_counter()
    for t in teachers:
        t.eval().to(device)
    shapes, images = {}, 0
    with atomic_dir(folder) as tmp:
        for split in key["splits"]:
            ds = PreparedDataset(data, split)
            with contextlib.ExitStack() as stack:
                out: NpyStream | None = None
                preds: NpyStream | None = None
                for start in range(0, len(ds), batch_size):
                    x = torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, len(ds)))])
                    maps = [t.encode(x.to(device)).float() for t in teachers]
                    # Each teacher's own prediction for its task (seg logits, then depth), at the image's size.
                    pred = torch.cat(
                        [
                            t.predict(m, x.shape[-2:])[task].float()
                            for t, m, task in zip(teachers, maps, ("seg", "depth"), strict=True)
                        ],
                        1,
                    )
                    if out is None:  # the first batch tells the channels and the grid
                        channels, grid = [m.shape[1] for m in maps], tuple(maps[0].shape[-2:])
                        shapes[split] = [len(ds), sum(channels), *grid]
                        shapes[f"{split}_targets"] = [len(ds), pred.shape[1], *x.shape[-2:]]
                        out = stack.enter_context(NpyStream(tmp / f"{split}.npy", shapes[split], np.float16))
                        preds = stack.enter_context(
                            NpyStream(tmp / f"{split}_targets.npy", shapes[f"{split}_targets"], np.float16)
                        )
                    assert out is not None and preds is not None
                    feats = torch.cat(maps, 1).clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()
                    for row in feats:
                        out.append(row)
                    for row in pred.clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy():
                        preds.append(row)
                    images += x.shape[0]
        seconds = time.perf_counter() - t0
        info: dict[str, Any] = {
            "key": key,
            "channels": channels,
            "grid": list(grid),
            "stride": MultiHeadNet.feature_stride,
            "dtype": "float16",
            "shapes": shapes,
            "teacher_forward_images": images,
            "build_seconds": round(seconds, 3),
            "bytes": sum(int(np.prod(s)) * 2 for s in shapes.values()),
        }
        write_json(tmp / "meta.json", info)
    for t in teachers:
        t.cpu()
    log.info(
        "teacher cache: %d images through both teachers in %.1fs → %s (%.1f MB float16)",
        images,
        seconds,
        folder,
        info["bytes"] / 1e6,
    )
    return info


def ensure(
    folder: Path,
    teachers: list[MultiHeadNet],
    key: dict,
    data: Path,
    device: torch.device,
    batch_size: int,
    wait_seconds: float = 6 * 3600,
) -> tuple[dict, bool]:
    """The cache in ``folder``, built first unless a matching one is there. Returns (cache, reused).

    Under torchrun only rank 0 builds; the other ranks wait for its cache to appear (the process group is
    not up yet at this point, so a file is the rendezvous).
    """
    cache = open_cache(folder, key)
    if cache is not None:
        log.info("teacher cache: reusing %s", folder)
        return cache, True
    if int(os.environ.get("RANK", "0")) != 0:
        deadline = time.monotonic() + wait_seconds
        while cache is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"teacher cache {folder}: rank 0 did not write it within {wait_seconds:.0f} s")
            time.sleep(1.0)
            cache = open_cache(folder, key)
        return cache, True
    build(folder, teachers, key, data, device, batch_size)
    cache = open_cache(folder, key)
    if cache is None:  # what build() just wrote must open: anything else is a bug, not bad input
        raise RuntimeError(f"teacher cache {folder}: written but unreadable")
    return cache, False
