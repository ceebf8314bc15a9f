"""Teacher quality and training speed on the embedded default (the CPU preset, default params):
test metrics against trivial baselines (majority class, mean training depth), wall time, images/s."""

from __future__ import annotations

import tempfile

from .common import run_json

TRAIN = """
import json, os, time
os.environ["JOINTDISTILL_PROGRESS"] = "off"
from jointdistill.config import load_params
from jointdistill.stages import prepare, teacher
p = load_params({params!r}, {sets!r})
prepare.run(p, {tmp!r} + "/prepared")
out = {{}}
for task in ("seg", "depth"):
    t = time.perf_counter()
    r = teacher.run(p, task, {tmp!r} + "/prepared", {tmp!r} + "/" + task)
    out[task] = {{"seconds": time.perf_counter() - t, "report": r}}
print(json.dumps(out))
"""


def rows(quick: bool, params: str) -> list[dict]:
    sets = (
        [
            "prepare.budget.seg=1.0",
            "prepare.num_samples=60",
            "prepare.height=48",
            "prepare.width=96",
            "teacher.epochs=1",
            "teacher.batch_size=4",
        ]
        if quick
        else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(TRAIN.format(params=params, sets=sets, tmp=tmp), one_core=False, timeout=3600)
    out = []
    for task, keys in (("seg", ("miou", "pixacc")), ("depth", ("abs_err", "rel_err", "delta1"))):
        r = res[task]["report"]
        for key in keys:
            value, base = r["test"][key], r["baseline"]["test"][key]
            higher = key not in ("abs_err", "rel_err")
            out.append(
                {
                    "name": f"{task} teacher test {key} (baseline: {r['baseline']['test']['predict']})",
                    "unit": key,
                    "median": value,
                    "min": value,
                    "max": value,
                    "target": f"{'>' if higher else '<'} baseline {base:.4g}",
                    "ok": value > base if higher else value < base,
                }
            )
        out.append(
            {
                "name": f"{task} teacher training ({r['epochs']} epochs, {r['model']['backbone']})",
                "unit": "s",
                "median": res[task]["seconds"],
                "min": res[task]["seconds"],
                "max": res[task]["seconds"],
                "note": f"{r['train_images_per_second']} train images/s, best epoch {r['best_epoch']}",
            }
        )
    return out
