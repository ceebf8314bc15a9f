"""The ablation (modes single, mtl, static_kd, adaptive, full; seeds 0–4) on the embedded default, through
`jointdistill.ablation`: one row per mode, Δm mean (min–max = mean ± std), every metric in the note.
`teacher-cache`: full with the cache (the default) and with live teachers (``full+live``) on the same seeds.
The recorded run (`make ablation`: the table, paired differences with 95 % intervals, the gate, the plots) is
in bench/results/ablation/."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from .common import run_json

RUN = """
import json, os
os.environ["JOINTDISTILL_PROGRESS"] = "off"
from jointdistill.config import apply_overrides, params_from_dict
from jointdistill import ablation as ablate
from jointdistill.stages import prepare
tmp = {tmp!r}
p = params_from_dict(apply_overrides(json.loads({data!r}), {sets!r}))
prepare.run(p, tmp + "/prepared")
print(json.dumps(ablate.run(p, tmp + "/prepared", tmp + "/ablation", {modes!r}, {seeds!r})))
"""


QUICK = [
    "prepare.budget.seg=1.0",
    "prepare.num_samples=60",
    "prepare.height=48",
    "prepare.width=96",
    "teacher.epochs=1",
    "teacher.batch_size=4",
    "distill.epochs=1",
    "distill.batch_size=4",
    "distill.probe_images=4",
]


def cache_rows(quick: bool, params: str) -> list[dict]:
    """Accuracy with and without the teacher-output cache: full vs full+cache, same seeds and teachers."""
    if quick:
        return rows(quick, params, ["single", "full", "full+live"], [0], "teacher cache")
    return rows(quick, params, ["single", "full", "full+live"], [0, 1], "teacher cache")


def rows(quick: bool, params: str, modes=None, seeds=None, label: str = "ablation") -> list[dict]:
    sets = QUICK if quick else []
    modes = modes or (["single", "mtl", "full"] if quick else ["single", "mtl", "static_kd", "adaptive", "full"])
    seeds = seeds or ([0] if quick else [0, 1, 2, 3, 4])
    data = json.dumps(yaml.safe_load(Path(params).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        table = run_json(
            RUN.format(tmp=tmp, data=data, sets=sets, modes=modes, seeds=seeds), one_core=False, timeout=4 * 3600
        )
    out = []
    for r in table:
        m, s = r["delta_m_mean"], r["delta_m_std"]
        out.append(
            {
                "name": f"{label}: {r['mode']} (Δm vs teachers, {r['seeds']} seeds)",
                "unit": "Δm %",
                "median": m,
                "min": m - s,
                "max": m + s,
                "note": f"mIoU {r['miou_mean']:.4f} ± {r['miou_std']:.4f}, pixAcc {r['pixacc_mean']:.4f} ± "
                f"{r['pixacc_std']:.4f}, AbsErr {r['abs_err_mean']:.3f} ± {r['abs_err_std']:.3f} m, "
                f"RelErr {r['rel_err_mean']:.4f} ± {r['rel_err_std']:.4f}",
            }
        )
    return out
