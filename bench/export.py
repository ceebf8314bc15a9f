"""Deployment latency: the ONNX student in onnxruntime (CPU provider) against the same student in PyTorch
eager, and against running both teachers (what the student replaces), at batch 1 and 8.

Weights do not change latency, so the models are built from params with random weights; each is exported
the way the `export` stage exports the student. Presets: ``default`` (params.yaml's CPU preset) and
``paper`` (ResNet-101 + ASPP teachers, ResNet-50 + ASPP student; opt-in, slow on a CPU). All cores are
used, as a deployment would; the medians are over ``runs`` timed runs after two warm-ups.

"Both teachers" is the sum of each teacher timed alone: run back to back, two onnxruntime sessions' spinning
thread pools fight over the cores (seen here: 82 ms instead of 40 ms at batch 8), which would flatter the
student.
"""

from __future__ import annotations

import tempfile

from .common import run_json

LATENCY = """
import json, os, statistics, time
import numpy as np, torch, onnxruntime as ort
from jointdistill.config import load_params
from jointdistill.models.export import export_onnx
from jointdistill.models import build_student, build_teacher
p = load_params({params!r}, {sets!r})
h, w = p.prepare.height, p.prepare.width
torch.manual_seed(0)
models = {{"student": build_student(p.student.backbone, p.student.head, 7, head_channels=p.student.head_channels)}}
for task in ("seg", "depth"):
    spec = p.teacher.for_task(task)
    models[f"teacher_{{task}}"] = build_teacher(task, spec.backbone, spec.head, 7, head_channels=spec.head_channels)
sessions, params_count = {{}}, {{}}
for name, m in models.items():
    m.eval()
    params_count[name] = sum(t.numel() for t in m.parameters())
    path = os.path.join({tmp!r}, name + ".onnx")
    if name == "student":
        export_onnx(m, torch.randn(2, 3, h, w), path, 18, 8)
    else:  # a teacher graph with the same settings: one output per task
        class One(torch.nn.Module):
            def __init__(s, m, t): super().__init__(); s.m, s.t = m, t
            def forward(s, image): return s.m(image)[s.t]
        torch.onnx.export(One(m, name.split("_")[1]).eval(), (torch.randn(2, 3, h, w),), path, dynamo=True,
                          opset_version=18, input_names=["image"],
                          dynamic_shapes={{"image": {{0: torch.export.Dim("batch", min=1),
                                                      2: 8 * torch.export.Dim("h", min=1),
                                                      3: 8 * torch.export.Dim("w", min=1)}}}})
    providers = ["CPUExecutionProvider"]
    if {device!r} == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    sessions[name] = ort.InferenceSession(path, providers=providers)
    assert sessions[name].get_providers()[0] == providers[0], sessions[name].get_providers()
    m.to({device!r})

def median_ms(fn, runs):
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times), max(times)

out = {{"params": params_count, "size": [h, w], "threads": torch.get_num_threads()}}
for batch in (1, 8):
    x = np.random.default_rng(batch).standard_normal((batch, 3, h, w), dtype=np.float32)
    def eager(names):
        def f():  # host array in, host arrays out, as onnxruntime's run() does
            with torch.no_grad():
                xt = torch.from_numpy(x).to({device!r})
                for n in names:
                    [v.cpu() for k, v in models[n](xt).items() if k != "features"]
        return f
    def onnx(names):
        def f():
            for n in names: sessions[n].run(None, {{"image": x}})
        return f
    run = onnx if {runtime!r} == "onnx" else eager
    seg, depth = median_ms(run(["teacher_seg"]), {runs}), median_ms(run(["teacher_depth"]), {runs})
    out[batch] = {{"student": median_ms(run(["student"]), {runs}),
                   "teachers": [a + b for a, b in zip(seg, depth)]}}
print(json.dumps(out))
"""

PAPER = [
    "teacher.backbone=resnet101",
    "teacher.head=aspp",
    "teacher.head_channels=256",
    "student.backbone=resnet50",
    "student.head=aspp",
    "student.head_channels=256",
]


def preset_rows(preset: str, sets: list[str], params: str, runs: int, device: str = "cpu") -> list[dict]:
    # One process per runtime: PyTorch's and onnxruntime's thread pools spin after work, so timing one right
    # after the other in a process makes the second look slow (seen: teachers in onnxruntime 2× slower).
    res = {}
    for runtime in ("onnx", "eager"):
        with tempfile.TemporaryDirectory() as tmp:
            got = run_json(
                LATENCY.format(params=params, sets=sets, tmp=tmp, runs=runs, runtime=runtime, device=device),
                one_core=False,
                timeout=3600,
            )
        res.update({k: v for k, v in got.items() if k in ("params", "size")})
        for batch in ("1", "8"):
            res.setdefault(batch, {}).update({f"{name}_{runtime}": v for name, v in got[batch].items()})
    h, w = res["size"]
    ep = "CUDA" if device == "cuda" else "CPU"
    size = (
        f"{h}×{w}, student {res['params']['student'] / 1e6:.2f} M params, teachers "
        f"{(res['params']['teacher_seg'] + res['params']['teacher_depth']) / 1e6:.2f} M"
    )
    rows = []
    for batch in ("1", "8"):
        r = res[batch]

        def row(name, key, r=r, batch=batch, **extra):
            med, lo, hi = r[key]
            return {
                "name": f"[{preset}] batch {batch}: {name}",
                "unit": "ms",
                "median": med,
                "min": lo,
                "max": hi,
                **extra,
            }

        s_onnx, s_eager = r["student_onnx"][0], r["student_eager"][0]
        t_onnx, t_eager = r["teachers_onnx"][0], r["teachers_eager"][0]
        rows += [
            row(
                f"student, onnxruntime {ep}",
                "student_onnx",
                target="≤ 0.8× student eager",
                ok=s_onnx <= 0.8 * s_eager,
                note=f"{s_onnx / s_eager:.2f}× eager; {size}",
            ),
            row(
                "student, PyTorch eager",
                "student_eager",
                target="≤ 0.5× both teachers eager",
                ok=s_eager <= 0.5 * t_eager,
                note=f"{s_eager / t_eager:.2f}× the teachers (eager)",
            ),
            row(
                f"both teachers, onnxruntime {ep}",
                "teachers_onnx",
                target="student onnx ≤ 0.5× this",
                ok=s_onnx <= 0.5 * t_onnx,
                note=f"student onnx / teachers onnx = {s_onnx / t_onnx:.2f}×",
            ),
            row("both teachers, PyTorch eager", "teachers_eager"),
        ]
    return rows


def rows(quick: bool, params: str, presets: tuple[str, ...] = ("default",), device: str = "cpu") -> list[dict]:
    if quick:
        return preset_rows("quick", ["prepare.height=48", "prepare.width=96"], params, runs=2)
    out = []
    for preset in presets:
        runs = 5 if preset == "paper" and device == "cpu" else 30
        out += preset_rows(
            preset if device == "cpu" else f"{preset}, {device}",
            PAPER if preset == "paper" else [],
            params,
            runs,
            device,
        )
    return out
