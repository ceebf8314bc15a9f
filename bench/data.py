"""Synthetic generator throughput (one core) and `prepare` wall time / peak memory."""

from __future__ import annotations

import json
import tempfile

from .common import run_json, summary

GENERATOR = """
import json, time
from jointdistill.data.synthetic import SyntheticScenes, tune_allocator
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
params = load_params({params!r}, [f"prepare.num_samples={n}"])
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
        {"name": "prepare peak RSS", "unit": "MB", **summary(peaks),
         "note": json.dumps({"frames": n}) + " — peak resident memory of the whole process"},
    ]
