"""End to end: `dvc repro` of the default pipeline in a fresh git repository holding a copy of this project
(wall time of every stage and in all, the largest process's peak RSS), and the training data loader against
the training step it feeds (is the loader the bottleneck?)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .common import run_json, summary

REPO = Path(__file__).resolve().parents[1]
QUICK = {
    "prepare": {"budget": {"seg": 1.0}, "num_samples": 40, "height": 48, "width": 96},
    "teacher": {"epochs": 1, "batch_size": 4},
    "distill": {"epochs": 1, "batch_size": 4, "probe_images": 2, "traj_batch": 2},
}


def _project_copy(dst: Path, params: str, overrides: dict) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("data/", "dvc.lock", "bench/results")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    data = yaml.safe_load(Path(params).read_text())
    for section, values in overrides.items():
        data[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@invalid",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench copy"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env, capture_output=True)


def repro_rows(quick: bool, params: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        _project_copy(project, params, QUICK if quick else {})
        env = {
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "JOINTDISTILL_PROGRESS": "off",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        t0 = time.perf_counter()
        r = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=4 * 3600)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"dvc repro failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        # The largest single process among everything dvc ran (all waited for, so all counted here).
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stages = re.findall(r"Running stage '([^']+)'", r.stdout)
        metrics = json.loads((project / "data" / "eval" / "report.json").read_text())
        train = {
            name: json.loads((project / "metrics" / name / "run.json").read_text())["train_seconds"]
            for name in ("teacher-seg", "teacher-depth", "distill")
        }
    student = metrics["student"]["test"]
    row = {
        "name": "dvc repro, default pipeline from scratch" + (" (quick params)" if quick else ""),
        "unit": "s",
        **summary([seconds]),
        "note": f"{len(stages)} stages: {', '.join(stages)}; training loops "
        + ", ".join(f"{k} {v:.0f} s" for k, v in train.items())
        + f"; student test mIoU {student['miou']:.4f}, AbsErr "
        f"{student['abs_err']:.3f} m",
    }
    if not quick:  # what `make run` costs on the default params
        row.update(target="≤ 600 (10 min)", ok=seconds <= 600)
    return [
        row,
        {"name": "dvc repro: peak RSS of the largest process", "unit": "MB", **summary([peak_mb])},
    ]


LOADER = """
import json, os, tempfile, time
import numpy as np, torch
from jointdistill.config import load_params
from jointdistill.data.prepared import PreparedDataset
from jointdistill.data.transforms import JointTransform
from jointdistill.training.sampling import EpochSampler, make_loader
from jointdistill.evaluation.metrics import depth_loss, seg_loss
from jointdistill.models import build_student
from jointdistill.stages import prepare
torch.manual_seed(0)
p = load_params({params!r}, {sets!r})
tmp = {tmp!r}
meta = prepare.run(p, tmp + "/prepared")
h, w = meta["resolution"]
bs, batches = p.distill.batch_size, {batches}
t = JointTransform.from_params(p.augment, h, w)
n = meta["counts"]["train"]
# the default teachers' two stride-8 maps (96 channels each), as the teacher cache stores them
np.save(tmp + "/feats.npy", np.full((n, 192, -(-h // 8), -(-w // 8)), 0.5, np.float16))
feats = np.load(tmp + "/feats.npy", mmap_mode="r")
out = {{}}
for name, workers, cached in (("loader", 0, False), ("loader + cached teacher maps", 0, True),
                              ("loader, 1 worker process", 1, False)):
    ds = PreparedDataset(tmp + "/prepared", "train", t, seed=0, features=feats if cached else None)
    sampler = EpochSampler(len(ds), bs, 0, True)
    loader = make_loader(ds, sampler, bs, workers, torch.device("cpu"), True)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    out[name] = (time.perf_counter() - t0) / batches
model = build_student(p.student.backbone, p.student.head, len(meta["classes"]))
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randn(bs, 3, h, w); y = torch.randint(0, len(meta["classes"]), (bs, h, w)); d = torch.rand(bs, 1, h, w) + 1
def step():
    o = model(x)
    loss = seg_loss(o["seg"], y, 255) + depth_loss(o["depth"], d, "l1")
    opt.zero_grad(); loss.backward(); opt.step()
step()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
out["student step"] = (time.perf_counter() - t0) / {steps}
print(json.dumps(out))
"""


def loader_rows(quick: bool, params: str) -> list[dict]:
    sets = (
        ["prepare.budget.seg=1.0", "prepare.num_samples=80", "prepare.height=48", "prepare.width=96"] if quick else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(
            LOADER.format(params=params, sets=sets, tmp=tmp, batches=5 if quick else 50, steps=3 if quick else 20),
            one_core=False,
        )
    step = res.pop("student step")
    rows = [
        {
            "name": "student training step (mtl, default student, batch of distill.batch_size)",
            "unit": "s/batch",
            **summary([step]),
        }
    ]
    for name, seconds in res.items():
        rows.append(
            {
                "name": f"{name}: one batch",
                "unit": "s/batch",
                **summary([seconds]),
                "target": "≤ 0.2× a step (not the bottleneck)",
                "ok": seconds <= 0.2 * step,
                "note": f"{seconds / step:.1%} of a training step",
            }
        )
    return rows
