"""The distill stage on the embedded default (CPU preset, default params): time per step of every mode, with
and without the teacher-output cache, against plain MTL, and what the knowledge trajectory costs (logging
time; storage against keeping the fused feature maps of the probe set at every timeframe). `distill-paper`:
the same step ratios with the paper's networks, where the teachers' forward dominates a step. `distill-steps`: what
JointDistill's own mechanisms (the connector, the trajectory pass) add to a static_kd step, against 1.25×.

Each mode trains 2 epochs; step times come from epoch 2 (epoch 1 of `full` has no trajectory loss yet: its
buffer is empty). The teachers train 1 epoch: their quality does not change the step time. The quality of
`mtl` vs `full` after the default number of epochs is in the ablation table (bench/results/ablation.md)."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import yaml

from .common import run_json, summary

# Both scripts start alike: the data prepared and both teachers trained 1 epoch (their quality does not change a step).
SETUP = """
import json, os, time
os.environ["JOINTDISTILL_PROGRESS"] = "off"
from jointdistill.config import apply_overrides, params_from_dict
from jointdistill.stages import prepare, teacher
tmp, data, sets, variants = {tmp!r}, json.loads({data!r}), {sets!r}, {variants!r}
def params(*extra):
    return params_from_dict(apply_overrides(data, sets + list(extra)))
base = params("teacher.epochs=1")
prepare.run(base, tmp + "/prepared")
for task in ("seg", "depth"):
    teacher.run(base, task, tmp + "/prepared", tmp + "/" + task)
"""
RUN = (
    SETUP
    + """
from jointdistill.stages import distill
out = {{}}
for name, mode, extra in variants:
    p = params("distill.mode=" + mode, "distill.epochs=2", "distill.timeframe_steps=0", *extra)
    teachers = None if mode == "mtl" else (tmp + "/seg", tmp + "/depth")
    r = distill.run(p, tmp + "/prepared", teachers, tmp + "/student-" + name, teacher_cache=tmp + "/cache")
    r["batch_size"] = p.distill.batch_size
    out[name] = r
print(json.dumps(out))
"""
)

CACHE = ["distill.teacher_cache=true"]
LIVE = ["distill.teacher_cache=false"]
VARIANTS = [
    ("mtl", "mtl", []),
    ("static_kd", "static_kd", LIVE),
    ("adaptive", "adaptive", LIVE),
    ("full", "full", LIVE),
    ("static_kd + teacher cache", "static_kd", CACHE),
    ("full + teacher cache", "full", CACHE),
]
# The paper's networks (DeepLabV3-ResNet-101 teachers, ResNet-50 + ASPP student) on this CPU at a small size:
# step-time ratios only (teachers trained 1 epoch); where the teachers dominate a step, as on a GPU.
PAPER = [
    "prepare.budget.seg=1.0",
    "prepare.num_samples=40",
    "prepare.height=64",
    "prepare.width=128",
    "teacher.backbone=resnet101",
    "teacher.head=aspp",
    "student.backbone=resnet50",
    "student.head=aspp",
    "teacher.batch_size=2",
    "distill.batch_size=2",
    "distill.probe_images=4",
    "distill.traj_batch=2",
]
PAPER_VARIANTS = [("mtl", "mtl", []), ("full", "full", LIVE), ("full + teacher cache", "full", CACHE)]


def _step_seconds(report: dict) -> list[float]:
    """Seconds per training step of each epoch after the first (loop only, validation excluded)."""
    return [report["batch_size"] / e["train/images_per_second"] for e in report["history"][1:]]


def _step_rows(res: dict, label: str = "") -> list[dict]:
    per_step = {m: _step_seconds(r) for m, r in res.items()}
    mtl_step = sum(per_step["mtl"]) / len(per_step["mtl"])
    out = []
    for mode, steps in per_step.items():
        mean = sum(steps) / len(steps)
        row = {
            "name": f"distill step{label}, {mode} (epoch 2)",
            "unit": "s/step",
            "median": mean,
            "min": min(steps),
            "max": max(steps),
            "ratio_vs_mtl": mean / mtl_step,
            "note": f"{mean / mtl_step:.2f}× mtl",
        }
        if "teacher cache" in mode:
            row.update(target="≤ 1.25× mtl", ok=mean / mtl_step <= 1.25)
            cache = res[mode]["teacher_cache"]
            if not cache["reused"]:
                row["note"] += (
                    f"; cache built once in {cache['build_seconds']:.1f} s ({cache['bytes'] / 1e6:.0f} MB float16)"
                )
        out.append(row)
    return out


def paper_rows(quick: bool, params: str) -> list[dict]:
    sets = PAPER + (["prepare.height=32", "prepare.width=64"] if quick else [])
    data = json.dumps(yaml.safe_load(Path(params).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(RUN.format(data=data, sets=sets, tmp=tmp, variants=PAPER_VARIANTS), one_core=False, timeout=7200)
    return _step_rows(res, " (paper nets, 64×128, batch 2)" if not quick else " (paper nets, 32×64)")


def rows(quick: bool, params: str) -> list[dict]:
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
    # Read once: editing params.yaml while the benchmark runs cannot change it half-way.
    data = json.dumps(yaml.safe_load(Path(params).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(RUN.format(data=data, sets=sets, tmp=tmp, variants=VARIANTS), one_core=False, timeout=7200)
    out = _step_rows(res)
    traj = res["full"]["trajectory"]
    share = traj["logging_share"]
    out.append(
        {
            "name": "trajectory logging time (full)",
            "unit": "% of train time",
            "median": 100 * share,
            "min": 100 * share,
            "max": 100 * share,
            "target": "≤ 3 %",
            "ok": share <= 0.03,
            "note": f"{traj['logging_seconds']:.2f} s of {res['full']['train_seconds']:.0f} s",
        }
    )
    ratio = traj["storage_ratio"]
    out.append(
        {
            "name": "trajectory storage vs full fused maps of the probe set",
            "unit": "% of full maps",
            "median": 100 * ratio,
            "min": 100 * ratio,
            "max": 100 * ratio,
            "target": "≤ 1 %",
            "ok": ratio <= 0.01,
            "note": f"{traj['bytes']} B parquet vs {traj['full_maps_bytes']} B float32 maps "
            f"({traj['timeframes']} timeframes × {traj['probe_images']} images, top-{traj['top_k']})",
        }
    )
    return out


# The same step, timed without the engine around it: each variant built as the distill stage builds it, then one
# optimisation step of each in turn, many rounds, on one pinned core. Taking turns spreads any drift of the
# machine over every variant alike, so the ratios are steadier than one epoch per mode run after another.
STEPS = (
    SETUP
    + """
from pathlib import Path
import torch
from jointdistill.data.contract import verify_prepared
from jointdistill.distill.builder import build
from jointdistill.distill.plan import DistillPlan
from jointdistill.training.engine import build_optimizer, build_scheduler, train_step
from jointdistill.training.sampling import EpochSampler, make_loader
rounds = {rounds!r}
meta, cpu, runs = verify_prepared(tmp + "/prepared"), torch.device("cpu"), {{}}
for name, mode, extra in variants:
    p = params("distill.mode=" + mode, *extra)
    plan = DistillPlan.from_params(p.distill, meta)
    b = build(p, plan, Path(tmp, "prepared"), meta, (tmp + "/seg", tmp + "/depth"), cpu, Path(tmp, "cache"))
    if plan.trajectory:  # a first timeframe's record fills the buffer: from here on every step has its trajectory pass
        b.objective.record_trajectories(1, 0, b.model)
    cfg = p.distill
    opt = build_optimizer(b.model, cfg)
    sampler = EpochSampler(len(b.train_set) - b.pool[0], cfg.batch_size, 0, True, length=b.epoch_samples,
                           pool=b.pool[0], pool_batch=b.pool[1])
    sampler.set_epoch(0)
    batches = iter(make_loader(b.train_set, sampler, sampler.step_size, 0, cpu, True))
    runs[name] = (b.model.train(), b.objective, opt, build_scheduler(opt, cfg, 10 ** 6), cfg, batches, [])
scaler = torch.amp.GradScaler("cpu", enabled=False)
for r in range(rounds + 2):
    for model, objective, opt, sched, cfg, batches, times in runs.values():
        t0 = time.perf_counter()
        batch = next(batches)
        model.steps.fill_(1)  # never a gradient-measurement step (they come every grad_log_every steps in every mode)
        train_step(model, objective, batch, opt, sched, scaler, cfg, None)
        if r >= 2:  # the first two rounds warm the allocator and the kernels
            times.append(time.perf_counter() - t0)
print(json.dumps({{name: v[-1] for name, v in runs.items()}}))
"""
)
STEP_VARIANTS = [
    ("static_kd", "static_kd", CACHE),
    ("full", "full", CACHE),
    ("full, no trajectory pass", "full", [*CACHE, "distill.traj_every=1000000"]),
    ("full, connector_channels 48", "full", [*CACHE, "distill.connector_channels=48"]),
]


def step_ratio_rows(quick: bool, params: str) -> list[dict]:
    """full's training step over static_kd's (both with the teacher cache, the default), and where the difference
    goes: the connector (full without its trajectory pass) and the trajectory pass; a narrower connector beside."""
    quick_sets = ["prepare.budget.seg=1.0", "prepare.num_samples=80", "prepare.height=48", "prepare.width=96"]
    sets = [*quick_sets, "distill.batch_size=4", "distill.probe_images=4"] if quick else []
    data = json.dumps(yaml.safe_load(Path(params).read_text()))
    rounds = 3 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        res = run_json(STEPS.format(data=data, sets=sets, tmp=tmp, variants=STEP_VARIANTS, rounds=rounds), timeout=3600)
    (base, _, _), *others = STEP_VARIANTS  # the first is the reference step, the second the one with the target
    static = statistics.median(res[base])
    out = []
    for i, (name, _, _) in enumerate(others):
        times = res[name]
        ratio = [t / static for t in times]
        row = {
            "name": f"training step, {name} / {base} (teacher cache, one core, turns)",
            "unit": "×",
            **summary([statistics.median(times) / static]),
            "note": f"median {statistics.median(times) * 1000:.0f} ms of {len(times)} steps "
            f"(per-step ratio {min(ratio):.2f}–{max(ratio):.2f})",
        }
        if i == 0:
            row.update(target="≤ 1.25×", ok=row["median"] <= 1.25)
        out.append(row)
    return out
