"""Synthetic generator throughput (one core) and `prepare` wall time / peak memory, including full-size
Cityscapes-format frames: peak memory must not grow with the number of frames (streaming)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .common import run_json, summary

GENERATOR = """
import json, time
from jointdistill.data.sources.street_scenes import SyntheticScenes, tune_allocator
g = SyntheticScenes({h}, {w}, seed=0, tune_memory={tune})
for i in range(3):
    g.render(10_000 + i)  # warm-up
rates = []
for rep in range({reps}):
    t = time.perf_counter()
    for i in range({frames}):
        g.render(rep * {frames} + i)
    rates.append({frames} / (time.perf_counter() - t))
print(json.dumps({{"rates": rates}}))
"""

PREPARE = """
import json, resource, time
from jointdistill.config import load_params
from jointdistill.stages import prepare
# Every frame labelled: the labelled path (images, labels, depth) is the one whose throughput matters.
params = load_params({params!r}, ["prepare.budget.seg=1.0", f"prepare.num_samples={n}"])
t = time.perf_counter()
prepare.run(params, {out!r})
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def generator_rows(quick: bool) -> list[dict]:
    rows = []
    configs = [(128, 256, 200, 200.0), (256, 512, 50, None)]
    for h, w, frames, target in configs:
        frames = max(5, frames // 20) if quick else frames
        reps = 1 if quick else 5
        for tune in (True, False):
            rates = run_json(GENERATOR.format(h=h, w=w, tune=tune, reps=reps, frames=frames))["rates"]
            s = summary(rates)
            row = {
                "name": f"synthetic generator {h}×{w}, 1 core" + ("" if tune else ", default allocator"),
                "unit": "frames/s",
                **s,
                "frames_per_run": frames,
            }
            if tune and target:
                row.update(target=f"≥ {target:g}", ok=s["median"] >= target)
            if not tune:
                row["note"] = "same frames with tune_memory=False: glibc's default malloc trims and re-faults memory"
            rows.append(row)
    return rows


def prepare_rows(quick: bool, params: str) -> list[dict]:
    n = 50 if quick else 1000
    times, peaks = [], []
    for _ in range(1 if quick else 3):
        with tempfile.TemporaryDirectory() as tmp:
            r = run_json(PREPARE.format(params=params, n=n, out=f"{tmp}/prepared"), one_core=False)
        times.append(r["seconds"])
        peaks.append(r["peak_rss_mb"])
    return [
        {"name": f"prepare {n} synthetic frames (128×256, default params)", "unit": "s", **summary(times)},
        {
            "name": "prepare peak RSS",
            "unit": "MB",
            **summary(peaks),
            "note": json.dumps({"frames": n}) + " — peak resident memory of the whole process",
        },
    ]


CITYSCAPES = """
import json, resource, time
from jointdistill.config import load_params
from jointdistill.stages import prepare
params = load_params({params!r}, ["prepare.dataset=cityscapes", "prepare.root={root}", "prepare.height=256",
                                  "prepare.width=512", "prepare.gallery_images=0", "prepare.budget.seg=1.0"])
t = time.perf_counter()
meta = prepare.run(params, {out!r})
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "frames": sum(meta["counts"].values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_cityscapes_frames(root: Path, n_train: int, n_val: int, h: int = 1024, w: int = 2048) -> None:
    """Full-size frames in the official names and formats; one rendered frame copied, as only memory and
    time are measured. Disparity has the holes real stereo leaves (about a third of the pixels)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], -1).astype(np.uint8)
    ids = ((yy // 64 + xx // 128) % 34).astype(np.uint8)
    disparity = (256 * (1 + 60 * yy / h) + 1).astype(np.uint16)
    disparity[rng.random((h, w)) < 0.35] = 0
    proto = root / "proto"
    proto.mkdir(parents=True)
    Image.fromarray(image).save(proto / "leftImg8bit.png", compress_level=1)
    Image.fromarray(ids).save(proto / "gtFine_labelIds.png")
    Image.fromarray(disparity).save(proto / "disparity.png")
    (proto / "camera.json").write_text(json.dumps({"extrinsic": {"baseline": 0.209313}, "intrinsic": {"fx": 2262.52}}))
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            stem = f"bench_{i:06d}_000019"
            for sub, name in (
                ("leftImg8bit", "leftImg8bit.png"),
                ("gtFine", "gtFine_labelIds.png"),
                ("disparity", "disparity.png"),
                ("camera", "camera.json"),
            ):
                folder = root / sub / split / "bench"
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(proto / name, folder / f"{stem}_{name}")


def cityscapes_rows(quick: bool, params: str) -> list[dict]:
    sizes = (20, 30) if quick else (20, 100)
    rows, peaks = [], {}
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_cityscapes_frames(Path(tmp) / "cs", n, max(2, n // 10))
            r = run_json(CITYSCAPES.format(params=params, root=f"{tmp}/cs", out=f"{tmp}/prepared"), one_core=False)
        peaks[n] = r["peak_rss_mb"]
        rows.append(
            {
                "name": f"prepare {r['frames']} Cityscapes-format frames 1024×2048 → 256×512",
                "unit": "s/frame",
                **summary([r["seconds"] / r["frames"]]),
            }
        )
        rows.append(
            {
                "name": f"prepare {r['frames']} Cityscapes-format frames: peak RSS",
                "unit": "MB",
                **summary([r["peak_rss_mb"]]),
            }
        )
    small, large = sizes
    growth = peaks[large] / peaks[small]
    rows.append(
        {
            "name": f"peak RSS growth, {large} vs {small} train frames",
            "unit": "×",
            **summary([growth]),
            "target": "≤ 1.1 (streaming)",
            "ok": growth <= 1.1,
            "note": "one frame in memory at a time: a 2975-frame train split needs the same memory",
        }
    )
    return rows
