"""The distill stage on the embedded default (CPU preset, default params): time per step of every mode
against plain MTL, what logging the knowledge trajectory costs (time, and storage against keeping the fused
feature maps of the probe set at every timeframe), and the val/test metrics of `mtl` vs `full` after the
default number of epochs.

Step times are taken from epoch 2 on (epoch 1 of `full` has no trajectory loss yet: its buffer is empty).
All runs use the same prepared data and teachers, one after another in one process tree."""

from __future__ import annotations

import tempfile

from .common import run_json

RUN = """
import json, os, time
os.environ["JOINTDISTILL_PROGRESS"] = "off"
from jointdistill.config import load_params
from jointdistill.stages import prepare, teacher, distill
tmp = {tmp!r}
base = load_params({params!r}, {sets!r})
prepare.run(base, tmp + "/prepared")
for task in ("seg", "depth"):
    teacher.run(base, task, tmp + "/prepared", tmp + "/" + task)
out = {{}}
for mode, extra in {runs!r}:
    p = load_params({params!r}, {sets!r} + ["distill.mode=" + mode] + extra)
    teachers = None if mode == "mtl" else (tmp + "/seg", tmp + "/depth")
    t = time.perf_counter()
    r = distill.run(p, tmp + "/prepared", teachers, tmp + "/student-" + mode + str(len(extra)))
    r["wall_seconds"] = time.perf_counter() - t
    r["batch_size"] = p.distill.batch_size
    out[mode + ("-speed" if extra else "")] = r
print(json.dumps(out))
"""

METRICS = (("miou", True), ("pixacc", True), ("abs_err", False), ("rel_err", False), ("delta1", True))


def _step_seconds(report: dict) -> list[float]:
    """Seconds per training step of each epoch after the first (loop only, validation excluded)."""
    return [report["batch_size"] / e["train/images_per_second"] for e in report["history"][1:]]


def rows(quick: bool, params: str) -> list[dict]:
    quick_sets = ["prepare.num_samples=80", "prepare.height=48", "prepare.width=96", "teacher.epochs=1",
                  "teacher.batch_size=4", "distill.epochs=2", "distill.batch_size=4", "distill.probe_images=4"]
    sets = quick_sets if quick else []
    speed = ["distill.epochs=2"]  # static_kd and adaptive: only their step time is measured
    runs = [("mtl", []), ("full", []), ("static_kd", speed), ("adaptive", speed)]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(RUN.format(params=params, sets=sets, tmp=tmp, runs=runs), one_core=False, timeout=7200)
    per_step = {m: _step_seconds(r) for m, r in (("mtl", res["mtl"]), ("full", res["full"]),
                                                  ("static_kd", res["static_kd-speed"]),
                                                  ("adaptive", res["adaptive-speed"]))}
    mtl_step = sum(per_step["mtl"]) / len(per_step["mtl"])
    out = []
    for mode, steps in per_step.items():
        mean = sum(steps) / len(steps)
        out.append({"name": f"distill step, mode {mode} (epochs 2+)", "unit": "s/step", "median": mean,
                    "min": min(steps), "max": max(steps), "ratio_vs_mtl": mean / mtl_step,
                    "note": f"{mean / mtl_step:.2f}× mtl"})
    traj = res["full"]["trajectory"]
    share = traj["logging_share"]
    out.append({"name": "trajectory logging time (full, all timeframes)", "unit": "% of train time",
                "median": 100 * share, "min": 100 * share, "max": 100 * share, "target": "≤ 3 %",
                "ok": share <= 0.03,
                "note": f"{traj['logging_seconds']:.2f} s of {res['full']['train_seconds']:.0f} s"})
    ratio = traj["storage_ratio"]
    out.append({"name": "trajectory storage vs full fused maps of the probe set", "unit": "% of full maps",
                "median": 100 * ratio, "min": 100 * ratio, "max": 100 * ratio, "target": "≤ 1 %", "ok": ratio <= 0.01,
                "note": f"{traj['bytes']} B parquet vs {traj['full_maps_bytes']} B float32 maps "
                        f"({traj['timeframes']} timeframes × {traj['probe_images']} images, top-{traj['top_k']})"})
    for split in ("val", "test"):
        for key, higher in METRICS:
            m, f = res["mtl"][split][key], res["full"][split][key]
            better = f > m if higher else f < m
            out.append({"name": f"{split} {key}: mtl vs full ({res['full']['epochs']} epochs)", "unit": key,
                        "median": f, "min": min(m, f), "max": max(m, f),
                        "note": f"mtl {m:.4f} → full {f:.4f} ({'better' if better else 'not better'})"})
    w = res["full"]["weights"]["final"]
    out.append({"name": "full: final teacher weights ω (seg / depth)", "unit": "ω", "median": w["seg"],
                "min": min(w.values()), "max": max(w.values()), "note": f"seg {w['seg']:.3f}, depth {w['depth']:.3f}"})
    return out
