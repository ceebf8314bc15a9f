"""Data-parallel scaling under `torchrun`: the same training stage with 1 process and with N processes
(`torchrun --standalone --nproc_per_node N`, gloo on CPU), each process on one thread, so N processes use N
cores. Throughput = train images/s (mean over the 2 epochs) summed over processes; efficiency = throughput(N) / (N ·
throughput(1)). On a GPU machine the same command runs one process per GPU (nccl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import run_json, summary

PREPARE = """
import json
from jointdistill.config import load_params
from jointdistill.stages import prepare, teacher
p = load_params({params!r}, {sets!r} + ["teacher.epochs=1"])
prepare.run(p, {tmp!r} + "/prepared")
for task in ("seg", "depth"):
    teacher.run(p, task, {tmp!r} + "/prepared", {tmp!r} + "/teacher-" + task)
print(json.dumps({{}}))
"""


def _run(args: list[str], nproc: int, tmp: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "JOINTDISTILL_PROGRESS": "off"}
    launcher = (
        [sys.executable, "-m", "jointdistill"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "jointdistill",
        ]
    )
    r = subprocess.run(launcher + args, cwd=tmp, env=env, capture_output=True, text=True, timeout=3 * 3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher + args)} failed:\n{r.stderr[-3000:]}")


def _throughput(out: Path) -> float:
    """Train images/s of the whole job: the stage reports one process's (mean over epochs) in run.json."""
    run = json.loads((out / "run.json").read_text())
    return run["train_images_per_second"] * json.loads((out / "report.json").read_text())["world_size"]


def rows(quick: bool, params: str, nprocs: int = 2) -> list[dict]:
    sets = (
        [
            "prepare.budget.seg=1.0",
            "prepare.num_samples=80",
            "prepare.height=48",
            "prepare.width=96",
            "teacher.batch_size=4",
            "distill.batch_size=4",
            "distill.probe_images=4",
        ]
        if quick
        else []
    )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        run_json(PREPARE.format(params=params, sets=sets, tmp=tmp), one_core=False, timeout=3600)
        common = ["--params", str(Path(params).resolve()), *[a for s in sets for a in ("--set", s)]]
        jobs = {
            "train-teacher --task seg": [
                "train-teacher",
                "--task",
                "seg",
                "--data",
                "prepared",
                "--set",
                "teacher.epochs=2",
                *common,
            ],
            "distill (full)": [
                "distill",
                "--data",
                "prepared",
                "--teachers",
                "teacher-seg",
                "teacher-depth",
                "--set",
                "distill.epochs=2",
                *common,
            ],
        }
        for name, args in jobs.items():
            ips = {}
            for n in (1, nprocs):
                folder = f"out-{len(out)}-{n}"
                _run([*args, "--out", folder, "--checkpoints", folder + "-ck"], n, tmp)
                ips[n] = _throughput(Path(tmp) / folder)
            eff = ips[nprocs] / (nprocs * ips[1])
            out.append({"name": f"{name}: 1 process, 1 thread", "unit": "images/s", **summary([ips[1]])})
            out.append(
                {
                    "name": f"{name}: torchrun {nprocs} processes × 1 thread",
                    "unit": "images/s",
                    **summary([ips[nprocs]]),
                    "note": f"scaling efficiency {eff:.0%} ({ips[nprocs] / ips[1]:.2f}× on {nprocs}× the cores)",
                }
            )
    return out
