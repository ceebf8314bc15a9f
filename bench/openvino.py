"""A second runtime: the exported student in OpenVINO's CPU plugin against onnxruntime, at each precision hint.

OpenVINO is an optional extra (``pip install 'jointdistill[openvino]'``); without it the suite says so and
writes nothing. It reads `make run`'s export (``data/export/student.onnx``) and test split (``data/prepared``):

- ``f32``: ``INFERENCE_PRECISION_HINT=f32``, what reproduces onnxruntime's outputs;
- the plugin's default: on a CPU with bf16 instructions (AVX512-BF16, AMX) it computes in bf16.

Per runtime: the largest depth difference from onnxruntime, segmentation argmax agreement, test mIoU and AbsErr
(the project's exact metrics), and the median batch-1 latency at the export's size, all cores.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = ROOT / "data" / "export" / "student.onnx"
DEFAULT_DATA = ROOT / "data" / "prepared"


def _median_ms(fn, x, runs: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def rows(quick: bool, params: str, model: str | Path | None = None, data: str | Path | None = None) -> list[dict]:
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("bench openvino: OpenVINO is not installed (pip install 'jointdistill[openvino]')") from None
    import torch

    from jointdistill.data.contract import verify_prepared
    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.evaluation.metrics import ConfusionMatrix, DepthMeter
    from jointdistill.serving.infer import StudentSession

    model, data = Path(model or DEFAULT_EXPORT), Path(data or DEFAULT_DATA)
    if not model.is_file():
        raise SystemExit(f"bench openvino: {model} is missing; run `make run` first")
    meta = verify_prepared(data)
    test = PreparedDataset(data, "test")
    n = min(len(test), 16 if quick else len(test))
    reference = StudentSession(model, "cpu")
    core = ov.Core()
    runtimes = {"onnxruntime": lambda x: reference.run(x)}
    precision = {}
    for name, config in (("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino default", {})):
        compiled = core.compile_model(str(model), "CPU", config)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        precision[name] = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

        def run(x, compiled=compiled):
            out = compiled(x)
            return out[compiled.output("segmentation_logits")], out[compiled.output("depth")]

        runtimes[name] = run
    results = {}
    for name, run in runtimes.items():
        cm, dm = ConfusionMatrix(len(meta["classes"]), meta["ignore_index"]), DepthMeter()
        max_diff, agree, pixels = 0.0, 0, 0
        for i in range(0, n, 8):
            items = [test[j] for j in range(i, min(i + 8, n))]
            x = np.stack([it["image"].numpy() for it in items])
            seg, depth = run(x)
            ref_seg, ref_depth = reference.run(x)
            max_diff = max(max_diff, float(np.abs(depth - ref_depth).max()))
            agree += int((seg.argmax(1) == ref_seg.argmax(1)).sum())
            pixels += seg.shape[0] * seg.shape[2] * seg.shape[3]
            cm.update(torch.from_numpy(np.ascontiguousarray(seg)), torch.stack([it["label"] for it in items]))
            dm.update(torch.from_numpy(np.ascontiguousarray(depth)), torch.stack([it["depth"] for it in items]))
        h, w = meta["resolution"]
        x1 = np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32)
        results[name] = {
            "miou": cm.compute()["miou"],
            "abs_err": dm.compute()["abs_err"],
            "max_depth_diff": max_diff,
            "agreement": agree / pixels,
            "ms": _median_ms(run, x1, 20 if quick else 200),
        }
    out = []
    base = results["onnxruntime"]
    for name, r in results.items():
        hint = f"precision {precision[name]}; " if name in precision else ""
        note = (
            f"{hint}test mIoU {r['miou']:.4f} (onnxruntime {base['miou']:.4f}), AbsErr {r['abs_err']:.3f} m "
            f"({base['abs_err']:.3f}); vs onnxruntime: depth max |Δ| {r['max_depth_diff']:.3g} m, argmax "
            f"agreement {100 * r['agreement']:.3f} % over {n} test images"
        )
        out.append(
            {
                "name": f"student, {name}, batch 1",
                "unit": "ms",
                "median": r["ms"],
                "min": r["ms"],
                "max": r["ms"],
                "runs": 1,
                "note": note,
            }
        )
    return out
