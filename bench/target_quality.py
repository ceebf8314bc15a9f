"""How good are the training targets? The sensor-like train labels and the teachers' cached predictions, both
scored against the exact ground truth of the same train images.

    python -m bench.target_quality --labels data/prepared --exact EXACT --cache CACHE [--every 3] [--out FILE]

``--labels``: the prepared data the teachers trained on (sensor-like train targets); ``--exact``: the same data
prepared with ``--set prepare.sensor.enabled=false`` (same images, exact targets); ``--cache``: a distill run's
teacher cache (its ``train_targets.npy``). Un-augmented images; every ``--every``-th train image.

Distillation can only add what the labels lack: where the teachers' predictions are worse targets than the labels
themselves, a KD term pulls the student away from the better target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jointdistill.data.prepared import PreparedDataset


def measure(labels: Path, exact: Path, cache: Path, every: int = 3) -> dict:
    noisy, clean = PreparedDataset(labels, "train"), PreparedDataset(exact, "train")
    if len(noisy) != len(clean):
        raise SystemExit(f"{labels} and {exact} have {len(noisy)} and {len(clean)} train images: not the same data")
    targets = np.load(cache / "train_targets.npy", mmap_mode="r")
    n = {"seg": 0, "depth": 0, "holes": 0, "valid": 0}
    sums = {"seg_label": 0.0, "seg_teacher": 0.0, "depth_label": 0.0, "depth_teacher": 0.0, "depth_teacher_holes": 0.0}
    images = range(0, len(noisy), every)
    for i in images:
        a, b = noisy[i], clean[i]
        if not bool((a["image"] == b["image"]).all()):
            raise SystemExit(f"train image {i} differs between {labels} and {exact}")
        truth, label = b["label"].numpy(), a["label"].numpy()
        pred = targets[i].astype(np.float32)
        keep = truth != noisy.ignore_index
        sums["seg_label"] += float((label[keep] == truth[keep]).sum())
        sums["seg_teacher"] += float((pred[:-1].argmax(0)[keep] == truth[keep]).sum())
        n["seg"] += int(keep.sum())
        d_true, d_label, d_teacher = b["depth"].numpy()[0], a["depth"].numpy()[0], pred[-1]
        both = (d_true > 0) & (d_label > 0)
        sums["depth_label"] += float(np.abs(np.log(d_label[both] / d_true[both])).sum())
        sums["depth_teacher"] += float(np.abs(np.log(d_teacher[both] / d_true[both])).sum())
        n["depth"] += int(both.sum())
        holes = (d_true > 0) & (d_label == 0)
        sums["depth_teacher_holes"] += float(np.abs(np.log(d_teacher[holes] / d_true[holes])).sum())
        n["holes"] += int(holes.sum())
        n["valid"] += int((d_true > 0).sum())
    return {
        "images": len(images),
        "seg_pixel_accuracy": {"labels": sums["seg_label"] / n["seg"], "teachers": sums["seg_teacher"] / n["seg"]},
        "depth_abs_log_error": {
            "labels": sums["depth_label"] / n["depth"],
            "teachers": sums["depth_teacher"] / n["depth"],
            "teachers_in_label_holes": sums["depth_teacher_holes"] / max(n["holes"], 1),
        },
        "label_holes_share_of_valid": n["holes"] / max(n["valid"], 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.target_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--exact", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = measure(args.labels, args.exact, args.cache, args.every)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
