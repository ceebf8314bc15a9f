"""Training throughput of the paper configuration on a GPU, against the card's own measured limits.

`python -m bench --only gpu` on a machine with a CUDA GPU (on a CPU it runs the same code at toy sizes:
`--quick` is what the tests run). Measured, in one process:

- the card's ceilings: a bf16 matrix product (8192³, random data) and a device-to-device copy;
- images/s, step time and peak GPU memory of one optimisation step (`engine.train_step`, the function the
  stages train with) for the DeepLabV3-ResNet-101 teachers and the ResNet-50 + ASPP student (mtl; full
  JointDistill with the teachers running; full with the teacher-output cache), at 256×512, in fp32,
  bf16 autocast, bf16 + channels_last, and bf16 + channels_last + torch.compile (`devices.compile_networks`);
- each step's model FLOPs (`torch.utils.flop_counter`, forward + backward, every network that runs) and so
  the FLOP-bound limit in images/s and the model-FLOPs utilisation (MFU) against the measured bf16 rate;
- the data loader (prepared synthetic frames with the training augmentation, pinned memory) at 0/4/8 worker
  processes, against the fastest teacher step: is the loader the bottleneck?
- one real epoch through `engine.train_one_epoch` (loader + steps) with the best settings.

Step timings use batches already on the GPU (the loader is measured separately), a few warm-up steps
(for compile: the first step's time is reported as compile time), then the median of timed steps with
the device synchronised around each.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

PAPER = {"teacher_backbone": "resnet101", "student_backbone": "resnet50", "head": "aspp"}


def _log(row: dict) -> None:
    # One line per row as soon as it exists: a run cut off by a time limit still shows what it measured.
    print("ROW " + json.dumps(row), file=sys.stderr, flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceilings(device, quick: bool) -> dict:
    """The card's bf16 matrix rate and copy bandwidth, measured here (METHOD: datasheet rates are leads)."""
    import torch

    n = 256 if quick or device.type != "cuda" else 8192
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10 if not quick else 3):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / statistics.median(times)
    m = (1 << 28) if device.type == "cuda" and not quick else (1 << 20)  # 512 MB of fp16
    x = torch.empty(m, device=device, dtype=torch.float16).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    ct = []
    for _ in range(10 if not quick else 3):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        ct.append(time.perf_counter() - t0)
    bw = 2 * x.numel() * x.element_size() / statistics.median(ct)
    del a, b, x, y
    return {"bf16_flops": flops, "copy_bytes_per_s": bw, "matmul_n": n}


# ----------------------------------------------------------------------------- the models under test
def _build(kind: str, classes: int, probes, params, arch: dict):
    """(model, objective, needs_cached_features) for one configuration, freshly initialised on the CPU."""
    import torch

    from jointdistill.distill.connector import Connector
    from jointdistill.distill.model import DistillModel
    from jointdistill.distill.objective import StudentObjective
    from jointdistill.distill.plan import DistillPlan
    from jointdistill.models import build_student, build_teacher
    from jointdistill.training.objectives import make_objective

    torch.manual_seed(0)
    if kind.startswith("teacher-"):
        task = kind.removeprefix("teacher-")
        return (
            build_teacher(task, arch["teacher_backbone"], arch["head"], classes),
            make_objective(task, classes),
            False,
        )
    mode = {"distill-mtl": "mtl", "distill-full": "full", "distill-full-cache": "full"}[kind]
    cached = kind.endswith("-cache")
    # The training step as such: no gradient-norm measurements (an extra backward per term every
    # grad_log_every steps) and a fixed trajectory weight instead of its calibration.
    cfg = params.distill.model_copy(
        update={
            "mode": mode,
            "probe_images": probes.shape[0],
            "traj_batch": min(params.distill.traj_batch, probes.shape[0]),
            "grad_log_every": 0,
            "traj_share": 0.0,
            "teacher_cache": cached,
        }
    )
    plan = DistillPlan.from_params(cfg)
    student = build_student(arch["student_backbone"], arch["head"], classes)
    if not plan.teachers:
        model = DistillModel(student, probes=probes)
        return model, StudentObjective(model, cfg, classes, 255, None, list(range(probes.shape[0]))), False
    teachers = [build_teacher(t, arch["teacher_backbone"], arch["head"], classes) for t in ("seg", "depth")]
    connector = Connector([t.feature_channels for t in teachers], classes, cfg.connector_channels)
    probe_feats = None
    if cached:
        with torch.no_grad():  # batch statistics: see _batch
            probe_feats = torch.cat([t.train().encode(probes) for t in teachers], 1).half().float()
    model = DistillModel(
        student,
        connector,
        [] if cached else teachers,
        probes,
        cfg.traj_every,
        cfg.traj_batch,
        probe_teacher_features=probe_feats,
        target_teachers=teachers if plan.targets_from_teachers and not cached else None,
    )
    objective = StudentObjective(model, cfg, classes, 255, {"seg": 0.5, "depth": 0.5}, list(range(probes.shape[0])))
    return model, objective, teachers if cached else False


def _start_trajectory(model, objective) -> None:
    """Full mode from its second timeframe on: the buffer holds a timeframe, so each step has L_traj."""
    from jointdistill.distill.objective import StudentObjective

    if isinstance(objective, StudentObjective) and objective.plan.trajectory:
        objective.record_trajectories(1, 0, model)
        assert model.trajectory_on


def _batch(ds, bs: int, device, channels_last: bool, teachers) -> dict:
    import torch

    from jointdistill.training.sampling import to_device as _to

    items = [ds[i % len(ds)] for i in range(bs)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "label", "depth")}
    batch = _to(batch, device, channels_last)
    if teachers:  # what the cache would bring: the teachers' maps of this batch, fp16
        # Batch statistics, not the running ones: through 100 layers an untrained network's eval-mode maps
        # outgrow fp16 (a trained teacher's do not); the step's cost does not depend on the values.
        with torch.no_grad():
            maps = [t.to(device).train().encode(batch["image"]) for t in teachers]
            batch["teacher_features"] = torch.cat(maps, 1).half()
            batch["feature_scale"] = torch.ones(bs, device=device)
            # and the teachers' own predictions (kd_target: teachers), as the cache stores them
            size = batch["image"].shape[-2:]
            batch["target_seg"] = teachers[0].predict(maps[0], size)["seg"].half().float()
            batch["target_depth"] = teachers[1].predict(maps[1], size)["depth"].half().float()
        for t in teachers:
            t.cpu()
    return batch


def _setup(kind: str, variant: dict, probes, params, arch: dict, device, **spec_update) -> SimpleNamespace:
    """A fresh model of ``kind`` on ``device`` in the variant's precision and layout, with the optimiser,
    schedule and scaler the stages would build (not compiled yet: callers choose when)."""
    import torch

    from jointdistill.training import devices, engine

    model, objective, teachers = _build(kind, 7, probes, params, arch)
    spec = (params.teacher if kind.startswith("teacher-") else params.distill).model_copy(
        update={"amp": variant["amp"], "channels_last": variant["cl"], "compile": variant["compile"], **spec_update}
    )
    channels_last = spec.channels_last == "on"
    amp = devices.amp_dtype(spec, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = engine.build_optimizer(model, spec)  # AdamW's state is made at its first step: nothing allocated here
    sched = engine.build_scheduler(opt, spec, 10_000)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return SimpleNamespace(
        model=model,
        objective=objective,
        teachers=teachers,
        spec=spec,
        channels_last=channels_last,
        amp=amp,
        opt=opt,
        sched=sched,
        scaler=scaler,
    )


def measure(
    kind: str, variant: dict, ds, probes, params, arch: dict, bs: int, device, steps: int, warm: int, flops: dict
) -> dict:
    """One configuration × one precision/layout/compile variant: step time, images/s, memory, MFU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from jointdistill.training import devices, engine

    torch.backends.cudnn.benchmark = variant.get("cudnn_benchmark", False)
    r = _setup(kind, variant, probes, params, arch, device)
    model, objective, spec, amp, opt, sched, scaler = r.model, r.objective, r.spec, r.amp, r.opt, r.sched, r.scaler
    batch = _batch(ds, bs, device, r.channels_last, r.teachers)
    _start_trajectory(model, objective)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    compiled = devices.compile_networks(model) if devices.use_compile(spec, device) else 0

    def step():
        return engine.train_step(model, objective, batch, opt, sched, scaler, spec, amp)

    if kind not in flops:  # FLOPs of one step do not depend on precision or layout: counted once, eagerly
        assert not compiled
        with FlopCounterMode(display=False) as fc:
            step()
        flops[kind] = fc.get_total_flops()
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warm):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    med = statistics.median(times)
    row = {
        "config": kind,
        "variant": variant["name"],
        "batch": bs,
        "step_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": bs / med,
        "first_step_s": first,
        "compiled_modules": compiled,
        "flops_per_step": flops[kind],
        "peak_gpu_bytes": mem,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return row


VARIANTS = {
    "fp32": {"name": "fp32", "amp": "off", "cl": "off", "compile": "off"},
    "bf16": {"name": "bf16", "amp": "bf16", "cl": "off", "compile": "off"},
    "bf16+cl": {"name": "bf16 + channels_last", "amp": "bf16", "cl": "on", "compile": "off"},
    "bf16+cl+compile": {"name": "bf16 + channels_last + compile", "amp": "bf16", "cl": "on", "compile": "on"},
    # cuDNN timing its kernels for the fixed training shapes: `fit` leaves it off (this row says whether it pays).
    "bf16+cl+cudnn-bench": {
        "name": "bf16 + channels_last, cudnn.benchmark on",
        "amp": "bf16",
        "cl": "on",
        "compile": "off",
        "cudnn_benchmark": True,
    },
}
# Eager runs first, compiled last (the most device time), most important configurations first in each.
PLAN = [
    ("teacher-seg", "fp32"),
    ("teacher-seg", "bf16"),
    ("teacher-seg", "bf16+cl"),
    ("teacher-seg", "bf16+cl+cudnn-bench"),
    ("teacher-depth", "bf16+cl"),
    ("distill-mtl", "bf16+cl"),
    ("distill-full", "fp32"),
    ("distill-full", "bf16+cl"),
    ("distill-full-cache", "bf16+cl"),
    ("teacher-seg", "bf16+cl+compile"),
    ("distill-full", "bf16+cl+compile"),
    ("distill-mtl", "bf16+cl+compile"),
    ("distill-full-cache", "bf16+cl+compile"),
]
QUICK_PLAN = [
    ("teacher-seg", "fp32"),
    ("teacher-seg", "bf16+cl"),
    ("teacher-depth", "bf16+cl"),
    ("distill-mtl", "fp32"),
    ("distill-full", "fp32"),
    ("distill-full-cache", "fp32"),
]


def loader_rows(ds, bs: int, device, workers: list[int], epochs: int) -> list[dict]:
    """Images/s the loader delivers (prepared frames + augmentation, pinned memory), no model: whole epochs
    through a fresh loader each, as `fit` makes them (worker start-up included)."""
    from jointdistill.training.sampling import EpochSampler, make_loader

    out = []
    for w in workers:
        sampler = EpochSampler(len(ds), bs, 0, True)
        n, t0 = 0, time.perf_counter()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for b in make_loader(ds, sampler, bs, w, device, True):
                b["image"].to(device, non_blocking=True)
                n += b["image"].shape[0]
        _sync(device)
        out.append({"workers": w, "images_per_s": n / (time.perf_counter() - t0), "images": n, "epochs": epochs})
    return out


def epoch_row(ds, params, arch: dict, bs: int, device, workers: int, variant: dict, probes) -> dict:
    """One real `train_one_epoch` (loader included) of the seg teacher with ``variant``."""
    from jointdistill.training import checkpoints, devices, engine, sampling

    r = _setup("teacher-seg", variant, probes, params, arch, device, batch_size=bs, num_workers=workers)
    if devices.use_compile(r.spec, device):
        devices.compile_networks(r.model)
    sampler = sampling.EpochSampler(len(ds), bs, 0, True)
    res = []
    for epoch in range(2):  # the first epoch warms up (and compiles); the second is reported
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        loader = sampling.make_loader(ds, sampler, bs, workers, device, True)
        state = checkpoints.RunState(epoch=epoch)
        t0 = time.perf_counter()
        engine.train_one_epoch(
            r.model,
            r.objective,
            loader,
            r.opt,
            r.sched,
            r.scaler,
            r.spec,
            device,
            state,
            r.amp,
            r.channels_last,
            lambda: None,
            False,
            sampler.batches_per_epoch(),
        )
        res.append(state.epoch_seen / (time.perf_counter() - t0))
    return {
        "variant": variant["name"],
        "workers": workers,
        "images_per_s": res[-1],
        "steps": sampler.batches_per_epoch(),
    }


def run(quick: bool, params_file: str) -> dict:
    import torch

    from jointdistill.config import apply_overrides, params_from_dict
    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.data.transforms import JointTransform
    from jointdistill.stages import prepare

    os.environ.setdefault("JOINTDISTILL_PROGRESS", "off")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda" and not quick
    h, w, bs = (256, 512, 16) if gpu else (32, 64, 2)
    arch = PAPER if gpu else {"teacher_backbone": "tiny", "student_backbone": "tiny", "head": "light"}
    raw = yaml.safe_load(Path(params_file).read_text())
    params = params_from_dict(
        apply_overrides(
            raw,
            [
                "prepare.budget.seg=1.0",
                f"prepare.num_samples={640 if gpu else 24}",
                f"prepare.height={h}",
                f"prepare.width={w}",
                "seed=0",
            ],
        )
    )
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "resolution": [h, w],
        "batch": bs,
        "arch": arch,
    }
    if device.type == "cuda":
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    info.update(ceilings(device, not gpu))
    _log({"ceilings": info})
    with tempfile.TemporaryDirectory() as tmp:
        prepare.run(params, tmp + "/prepared")
        ds = PreparedDataset(tmp + "/prepared", "train", JointTransform.from_params(params.augment, h, w), seed=0)
        val = PreparedDataset(tmp + "/prepared", "val")
        probes = torch.stack([val[i]["image"] for i in range(min(len(val), 8 if gpu else 2))])
        rows, flops = [], {}
        plan = PLAN if gpu else QUICK_PLAN
        if os.environ.get("JOINTDISTILL_GPU_BENCH_NO_COMPILE"):
            plan = [p for p in plan if "compile" not in p[1]]
        steps, warm = (8, 2) if gpu else (2, 1)
        # Every backbone shares one forward function: the bench compiles it in more situations (models, modes,
        # shapes) than one training run does, so allow it more cached variants than compile_networks does.
        torch._dynamo.config.cache_size_limit = 64
        loader = loader_rows(ds, bs, device, [0, 4, 8] if gpu else [0], 2)
        for row in loader:
            _log({"loader": row})
        for kind, v in plan:
            try:
                row = measure(kind, VARIANTS[v], ds, probes, params, arch, bs, device, steps, warm, flops)
            except Exception as e:  # one failing variant (e.g. a compiler error) must not lose the others
                row = {"config": kind, "variant": VARIANTS[v]["name"], "error": f"{type(e).__name__}: {e}"[:500]}
            _log(row)
            rows.append(row)
            if device.type == "cuda":  # the variant's model and optimiser are gone: give their memory back
                torch.cuda.empty_cache()
        ok = [r for r in rows if r["config"] == "teacher-seg" and "error" not in r]
        best = min(ok, key=lambda r: r["step_s"]) if ok else None
        variant = (
            next(v for v in VARIANTS.values() if best and v["name"] == best["variant"]) if best else VARIANTS["fp32"]
        )
        epoch = epoch_row(ds, params, arch, bs, device, 8 if gpu else 0, variant, probes)
        _log({"epoch": epoch})
    return {"info": info, "steps": rows, "loader": loader, "epoch": epoch}


def table_rows(res: dict) -> list[dict]:
    """The suite's rows for bench/results (JSON + markdown)."""
    info = res["info"]
    peak = info["bf16_flops"]
    out = [
        {
            "name": f"card: bf16 matrix product {info['matmul_n']}³ (measured)",
            "unit": "TFLOP/s",
            "median": peak / 1e12,
            "min": peak / 1e12,
            "max": peak / 1e12,
        },
        {
            "name": "card: device-to-device copy (read + write, measured)",
            "unit": "GB/s",
            "median": info["copy_bytes_per_s"] / 1e9,
            "min": info["copy_bytes_per_s"] / 1e9,
            "max": info["copy_bytes_per_s"] / 1e9,
        },
    ]
    eager = {}
    for r in res["steps"]:
        name = f"{r['config']} step, {r['variant']}"
        if "error" in r:
            out.append(
                {
                    "name": name,
                    "unit": "images/s",
                    "median": 0.0,
                    "min": 0.0,
                    "max": 0.0,
                    "note": "failed: " + r["error"],
                }
            )
            continue
        ips = r["images_per_s"]
        limit = peak * r["batch"] / r["flops_per_step"]  # images/s if every FLOP ran at the measured bf16 rate
        mfu = r["flops_per_step"] / r["step_s"] / peak
        if r["variant"] == VARIANTS["bf16+cl"]["name"]:
            eager[r["config"]] = r
        note = (
            f"{r['step_s'] * 1e3:.1f} ms/step (batch {r['batch']}); {r['flops_per_step'] / 1e9:.0f} GFLOP/step; "
            f"FLOP-bound limit {limit:.0f} images/s; MFU {100 * mfu:.1f} %"
        )
        if r.get("peak_gpu_bytes"):
            note += f"; peak GPU memory {r['peak_gpu_bytes'] / 2**30:.1f} GiB"
        if r["compiled_modules"]:
            note += f"; first step (compile) {r['first_step_s']:.0f} s"
        out.append(
            {
                "name": name,
                "unit": "images/s",
                "median": ips,
                "min": r["batch"] / r["max_s"],
                "max": r["batch"] / r["min_s"],
                "mfu": mfu,
                "flop_limit_images_per_s": limit,
                "note": note,
            }
        )
    for r in res["steps"]:
        if "error" in r or r["variant"] != VARIANTS["bf16+cl+compile"]["name"] or r["config"] not in eager:
            continue
        gain = eager[r["config"]]["step_s"] / r["step_s"]
        out.append(
            {
                "name": f"{r['config']}: compile speed-up over bf16 + channels_last eager",
                "unit": "×",
                "median": gain,
                "min": gain,
                "max": gain,
            }
        )
    by = {(r["config"], r["variant"]): r for r in res["steps"] if "error" not in r}
    for v in ("bf16 + channels_last", "bf16 + channels_last + compile"):
        mtl = by.get(("distill-mtl", v))
        for cfg in ("distill-full", "distill-full-cache"):
            if mtl and (cfg, v) in by:
                ratio = by[(cfg, v)]["step_s"] / mtl["step_s"]
                out.append(
                    {
                        "name": f"{cfg} step / distill-mtl step, {v}",
                        "unit": "×",
                        "median": ratio,
                        "min": ratio,
                        "max": ratio,
                        "target": "≤ 1.25×",
                        "ok": ratio <= 1.25,
                    }
                )
    fastest = min(
        (r for r in res["steps"] if "error" not in r and r["config"].startswith("teacher-")),
        key=lambda r: r["step_s"],
        default=None,
    )
    for r in res["loader"]:
        per_epoch = r["images"] // r["epochs"]
        row = {
            "name": f"loader, {r['workers']} workers, pinned memory ({r['epochs']} epochs of {per_epoch} images, "
            "fresh workers each)",
            "unit": "images/s",
            "median": r["images_per_s"],
            "min": r["images_per_s"],
            "max": r["images_per_s"],
        }
        if fastest:
            row.update(
                target=f"≥ fastest teacher step ({fastest['images_per_s']:.0f} images/s)",
                ok=r["images_per_s"] >= fastest["images_per_s"],
            )
        out.append(row)
    e = res["epoch"]
    out.append(
        {
            "name": f"teacher-seg epoch through train_one_epoch ({e['variant']}, {e['workers']} workers)",
            "unit": "images/s",
            "median": e["images_per_s"],
            "min": e["images_per_s"],
            "max": e["images_per_s"],
            "note": f"{e['steps']} steps, second epoch (loader, transfer, step, one host sync per step)",
        }
    )
    return out


def rows(quick: bool, params: str) -> list[dict]:
    res = run(quick, params)
    out = Path(os.environ.get("JOINTDISTILL_GPU_BENCH_RAW", ""))
    if out.name:
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return table_rows(res)


if __name__ == "__main__":
    print(json.dumps(copy.deepcopy(run("--quick" in sys.argv, sys.argv[-1])), default=str))
