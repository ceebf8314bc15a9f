"""The `export` stage: the student as ONNX, gated on parity with PyTorch, with optional fp16 / int8 variants.

Outputs (``out``): ``student.onnx`` (+ ``student.fp16.onnx``, ``student.int8.onnx`` when enabled),
``parity.json`` (onnxruntime vs eager: per output max/mean abs error, depth relative error, argmax agreement;
on val images, random inputs, and other batch sizes and image sizes), ``report.json`` (test metrics of each
file, sizes, FLOPs) and ``MODEL_CARD.md``; in the metrics folder ``metrics.json`` (size) and
``run.json`` (latency of every file, the machine; see `records`). Latency depends on the machine, so it stays out of
the output: the same inputs give the same files.

If parity breaks ``export.depth_rel_tol`` or ``export.seg_agreement_min`` the stage fails, ``out`` is left
as it was (no new .onnx anywhere), and the failing report is written beside it as ``OUT.parity-failed.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jointdistill import __version__
from jointdistill.config import Params
from jointdistill.data.contract import verify_prepared
from jointdistill.data.prepared import PreparedDataset
from jointdistill.errors import DataError, ModelError
from jointdistill.evaluation.scoring import score_model, score_session
from jointdistill.io import atomic_dir, atomic_write_text, write_json
from jointdistill.models.checked import load_student
from jointdistill.models.export import eager_outputs, export_onnx
from jointdistill.provenance import codeid, lineage, records
from jointdistill.serving.infer import StudentSession
from jointdistill.serving.onnx_file import (
    Parity,
    check_graph,
    fp16_variant,
    int8_variant,
    median_ms,
    metadata_props,
    parity_problems,
    set_metadata,
)
from jointdistill.stages.results import ExportResult

log = logging.getLogger(__name__)
METRIC_KEYS = ("miou", "pixacc", "abs_err", "rel_err", "delta1")


def _batches(ds: PreparedDataset, n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, n))]).numpy()


def _compare(student, session: StudentSession, batches) -> dict:
    parity = Parity()
    for batch in batches:
        parity.update(eager_outputs(student, batch), session.run(batch))
    return parity.result()


def _shape_checks(
    student, session: StudentSession, size: tuple[int, int], multiple: int | None, rng: np.random.Generator
) -> list[dict]:
    """Batch 1 and 3 at the training size and, when H and W are dynamic, two other sizes: an exporter that
    silently baked in the traced shape fails here."""
    h, w = size
    shapes = [(1, h, w), (3, h, w)]
    if multiple:
        shapes += [
            (2, max(multiple, h // 2 // multiple * multiple), max(multiple, w // 2 // multiple * multiple)),
            (1, h + 2 * multiple, w + 4 * multiple),
        ]
    rows = []
    for n, hh, ww in shapes:
        batch = rng.standard_normal((n, 3, hh, ww), dtype=np.float32)
        rows.append({"shape": [n, 3, hh, ww], **_compare(student, session, [batch])})
    return rows


def _test_metrics(
    session: StudentSession, test: PreparedDataset, batch_size: int, num_classes: int, ignore: int
) -> dict:
    return {k: v for k, v in score_session(session, test, batch_size, num_classes, ignore).items() if k in METRIC_KEYS}


def _latency(fn_for_batch, size: tuple[int, int], runs: int, rng: np.random.Generator) -> dict:
    out = {}
    for n in (1, 8):
        x = rng.standard_normal((n, 3, *size), dtype=np.float32)
        out[f"batch{n}_ms"] = round(median_ms(lambda x=x: fn_for_batch(x), runs), 3)
    return out


def run(
    params: Params, data: str | Path, student: str | Path, out: str | Path, metrics_dir: str | Path | None = None
) -> ExportResult:
    cfg = params.export
    data, student, out = Path(data), Path(student), Path(out)
    t_start = time.perf_counter()
    meta = verify_prepared(data)
    model, record = load_student(student, meta)
    model = model.eval()
    num_classes, ignore = len(meta["classes"]), int(meta["ignore_index"])
    h, w = (int(v) for v in (record.get("resolution") or meta["resolution"]))
    size = (h, w)
    stride = int(model.feature_stride)
    multiple = stride if cfg.dynamic_size and size[0] % stride == 0 and size[1] % stride == 0 else None
    if cfg.dynamic_size and multiple is None:
        log.warning("export: training size %s×%s is not a multiple of %d; H and W are fixed to it", *size, stride)
    val, test = PreparedDataset(data, "val"), PreparedDataset(data, "test")
    if len(val) < 2:
        raise DataError(f"{data}: export needs at least 2 val images (parity and the example batch), found {len(val)}")
    n_parity = len(val) if cfg.parity_images == 0 else min(cfg.parity_images, len(val))
    rng = np.random.default_rng(params.seed)
    code = codeid.source_digest(__name__)
    failed_report = out.parent / f"{out.name}.parity-failed.json"
    tolerance = {"depth_rel_tol": cfg.depth_rel_tol, "seg_agreement_min": cfg.seg_agreement_min}
    torch.manual_seed(params.seed)

    with atomic_dir(out) as tmp:
        parents = {"prepared": data, "student": student}
        lineage.write(tmp, lineage.record("export", params.digest("export"), parents, module=__name__))
        onnx_path = tmp / "student.onnx"
        t0 = time.perf_counter()
        example = torch.stack([val[0]["image"], val[1]["image"]])
        export_onnx(model, example, onnx_path, cfg.opset, multiple)
        set_metadata(onnx_path, metadata_props(record, meta, multiple, cfg.opset, "fp32", code))
        check_graph(onnx_path)
        export_seconds = time.perf_counter() - t0
        session = StudentSession(onnx_path, "cpu")

        fp32: dict[str, Any] = {
            "val": _compare(model, session, _batches(val, n_parity, cfg.batch_size)),
            "random": _compare(
                model, session, [rng.standard_normal((2, 3, *size), dtype=np.float32) for _ in range(2)]
            ),
            "shapes": _shape_checks(model, session, size, multiple, rng),
        }
        problems = [f"{group}: {p}" for group in ("val", "random") for p in parity_problems(fp32[group], **tolerance)]
        problems += [f"shape {row['shape']}: {p}" for row in fp32["shapes"] for p in parity_problems(row, **tolerance)]
        parity: dict[str, Any] = {
            "passed": not problems,
            "problems": problems,
            "tolerance": tolerance,
            "size_multiple": multiple,
            "input_size": list(size),
            "fp32": fp32,
            "variants": {},
        }
        if problems:
            write_json(failed_report, parity)
            raise ModelError(
                f"export: onnxruntime does not match PyTorch ({'; '.join(problems)}); nothing was "
                f"written to {out}; the full comparison is in {failed_report}"
            )
        log.info(
            "export: parity on %d val images: depth max rel err %.2e, seg argmax agreement %.5f",
            fp32["val"]["images"],
            fp32["val"]["depth"]["max_rel_err"],
            fp32["val"]["segmentation_logits"]["argmax_agreement"],
        )

        test_metrics = {
            "pytorch": {
                k: v
                for k, v in score_model(
                    model, ("seg", "depth"), test, num_classes, ignore, cfg.batch_size, torch.device("cpu")
                ).metrics.items()
                if k in METRIC_KEYS
            }
        }
        test_metrics["onnx"] = _test_metrics(session, test, cfg.batch_size, num_classes, ignore)
        latency = {
            "pytorch": _latency(lambda x: eager_outputs(model, x), size, cfg.latency_runs, rng),
            "onnx": _latency(session.run, size, cfg.latency_runs, rng),
        }
        files = {"fp32": onnx_path}

        variants = []
        if cfg.fp16:
            variants.append(("fp16", "fp16", lambda dst: fp16_variant(onnx_path, dst)))
        if cfg.int8 != "none":
            n_cal = min(cfg.calibration_images, len(val))
            variants.append(
                (
                    f"int8-{cfg.int8}",
                    "int8",
                    lambda dst: int8_variant(onnx_path, dst, cfg.int8, _batches(val, n_cal, cfg.batch_size)),
                )
            )
        for name, suffix, build in variants:
            path = tmp / f"student.{suffix}.onnx"
            build(path)
            set_metadata(path, metadata_props(record, meta, multiple, cfg.opset, name, code))
            check_graph(path)
            vs = StudentSession(path, "cpu")
            parity["variants"][name] = {
                "file": path.name,
                "val": _compare(model, vs, _batches(val, n_parity, cfg.batch_size)),
            }
            test_metrics[name] = _test_metrics(vs, test, cfg.batch_size, num_classes, ignore)
            latency[name] = _latency(vs.run, size, cfg.latency_runs, rng)
            files[name] = path
            del vs

        sizes = {name: p.stat().st_size for name, p in files.items()}
        report: dict[str, Any] = {
            "test": test_metrics["onnx"],
            "test_by_model": test_metrics,
            "latency_ms": latency,
            "latency_runs": cfg.latency_runs,
            "file_bytes": sizes,
            "export_seconds": round(export_seconds, 2),
            "seconds": round(time.perf_counter() - t_start, 2),
            "opset": cfg.opset,
            "code": code,
            "params_digest": record.get("params_digest"),
            "flops": _flops(model, student, size),
        }
        write_json(tmp / "parity.json", parity)
        content, run_facts = records.split(report)
        write_json(tmp / records.REPORT, content)
        atomic_write_text(tmp / "MODEL_CARD.md", model_card(record, meta, parity, content, multiple))
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, curated(report), run_facts)
    failed_report.unlink(missing_ok=True)
    log.info(
        "export: %s (%.1f MB), test mIoU %.4f AbsErr %.3f m via onnxruntime, in %.1f s",
        out / "student.onnx",
        sizes["fp32"] / 1e6,
        report["test"]["miou"],
        report["test"]["abs_err"],
        report["seconds"],
    )
    return ExportResult({"parity": parity, **report})


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _flops(model, student_dir: Path, size: tuple[int, int]) -> dict:
    """FLOPs of one image at the training size: the student's, and its teachers' as recorded by distill."""
    from jointdistill.models import model_flops

    info = {}
    try:
        info = json.loads((Path(student_dir) / "report.json").read_text())
    except (OSError, ValueError):
        pass
    out = {"student": model_flops(model, *size)}
    for task, t in (info.get("teachers") or {}).items():
        if isinstance(t, dict) and t.get("flops"):
            out[f"teacher_{task}"] = t["flops"]
    return out


def curated(report: dict) -> dict:
    """The export's few numbers for metrics.json: the ONNX file's size and its parity with PyTorch. Only numbers
    the inputs determine (DVC's run cache needs that of an uncached out); latency is in run.json, test metrics in
    report.json; names differ from evaluate's, so DVC shows them without a file prefix."""
    return {"size_mb": report["file_bytes"]["fp32"] / 1e6}


def model_card(record: dict, meta: dict, parity: dict, report: dict, multiple: int | None) -> str:
    h, w = parity["input_size"]
    norm = record.get("normalization") or meta["normalization"]
    config = record.get("config", {})
    size_rule = (
        f"any height and width that are multiples of {multiple} (trained at {h}×{w}; best accuracy near it)"
        if multiple
        else f"exactly {h}×{w}"
    )
    lines = [
        "# Model card: jointdistill student",
        "",
        "One network that predicts, for every pixel of an RGB image, a **semantic class** and a **metric depth**.",
        f"It was distilled (JointDistill, mode `{record.get('mode')}`) from two single-task teachers into a "
        f"`{config.get('backbone')}` encoder with `{config.get('head')}` heads, on the `{meta['dataset']}` dataset.",
        "",
        "## Files",
        "",
        "| file | variant | size | for |",
        "| --- | --- | --- | --- |",
    ]
    use = {
        "fp32": "reference; CPU and GPU",
        "fp16": "GPUs (CUDA execution provider)",
        "int8-dynamic": "CPU, smaller",
        "int8-static": "CPU, smaller and faster",
    }
    for name, size in report["file_bytes"].items():
        file = "student.onnx" if name == "fp32" else parity["variants"][name]["file"]
        lines.append(f"| `{file}` | {name} | {size / 1e6:.2f} MB | {use.get(name, '')} |")
    lines += [
        "",
        "## Input and outputs",
        "",
        f"- input `image`: float32 N×3×H×W, RGB scaled to [0, 1], then `(x - mean) / std` with mean "
        f"{norm['mean']} and std {norm['std']}; N is free; H×W: {size_rule}.",
        f"- output `segmentation_logits`: float32 N×{len(meta['classes'])}×H×W; the class is the argmax over axis 1.",
        "- output `depth`: float32 N×1×H×W, metres, always > 0.",
        "- `metadata_props` hold all of the above (every value JSON): `classes`, `palette`, `input_size`, "
        "`size_multiple`, `mean`, `std`, `depth_unit`, `params_digest`, `code_digest`, …",
        "",
        "## Classes",
        "",
        "| id | class | colour (RGB) |",
        "| --- | --- | --- |",
    ]
    for i, (name, colour) in enumerate(zip(meta["classes"], record["palette"], strict=True)):
        lines.append(f"| {i} | {name} | {tuple(colour)} |")
    lines += [
        "",
        f"## Accuracy on `test` ({meta['counts']['test']} images)",
        "",
        "| model | mIoU | pixAcc | AbsErr (m) | RelErr | δ<1.25 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, t in report["test_by_model"].items():
        label = {"pytorch": "PyTorch eager (fp32)", "onnx": "`student.onnx` in onnxruntime"}.get(
            name, f"`{name}` variant"
        )
        lines.append(
            f"| {label} | {_fmt(t.get('miou'))} | {_fmt(t.get('pixacc'))} | {_fmt(t.get('abs_err'), 3)} | "
            f"{_fmt(t.get('rel_err'))} | {_fmt(t.get('delta1'))} |"
        )
    v = parity["fp32"]["val"]
    tol = parity["tolerance"]
    lines += [
        "",
        "## Parity with PyTorch",
        "",
        f"onnxruntime (CPU) against PyTorch eager on {v['images']} val images: segmentation logits max |Δ| "
        f"{v['segmentation_logits']['max_abs_err']:.2e}, argmax agreement "
        f"{100 * v['segmentation_logits']['argmax_agreement']:.3f} %; depth max |Δ| {v['depth']['max_abs_err']:.2e} m, "
        f"max relative error {v['depth']['max_rel_err']:.2e}. The export fails unless depth relative error ≤ "
        f"{tol['depth_rel_tol']:g} and agreement ≥ {100 * tol['seg_agreement_min']:g} % (also checked on random "
        f"inputs and at shapes {', '.join('×'.join(map(str, r['shape'])) for r in parity['fp32']['shapes'])}).",
    ]
    for name, res in parity["variants"].items():
        r = res["val"]
        lines.append(
            f"- `{name}`: argmax agreement {100 * r['segmentation_logits']['argmax_agreement']:.2f} %, "
            f"depth max relative error {r['depth']['max_rel_err']:.2e} (not gated; see its test accuracy)."
        )
    lines += [
        "",
        "## Other runtimes",
        "",
        "- OpenVINO (CPU plugin): compile with `INFERENCE_PRECISION_HINT` set to `f32` to reproduce the parity "
        "above. Its default on a CPU with bf16 instructions (AVX512-BF16, AMX) computes in bf16: faster on such "
        "CPUs, but depth moves by centimetres to metres and some pixels change class. `python -m bench --only "
        "openvino` measures both hints against onnxruntime on this model's test split (accuracy, largest depth "
        "change, label agreement, latency).",
    ]
    lines += [
        "",
        "## Latency",
        "",
        "Latency depends on the machine, so it is not written here: the export measured every file on its own "
        "machine (`latency_ms` in the stage's run.json, per file and batch size), and "
        "`jointdistill bench export` measures it on yours.",
    ]
    flops = report.get("flops") or {}
    if flops:
        lines += [
            "",
            f"## Cost at {h}×{w}",
            "",
            f"{flops['student'] / 1e9:.3f} GFLOP per image (forward, counted by `torch.utils.flop_counter`).",
        ]
        teachers = {k: v for k, v in flops.items() if k.startswith("teacher_")}
        if teachers:
            total = sum(teachers.values())
            lines[-1] += (
                " Its teachers: "
                + ", ".join(f"{k.removeprefix('teacher_')} {v / 1e9:.3f}" for k, v in teachers.items())
                + f" GFLOP; the student costs {100 * flops['student'] / total:.0f} % of the two together."
            )
    lines += [
        "",
        "## Use",
        "",
        "```",
        "jointdistill predict student.onnx photos/ --out predictions/",
        "```",
        "",
        "writes per image `NAME.labels.png` (palette PNG of class ids), `NAME.depth.png` (16-bit, millimetres) and "
        "`NAME.depth_color.png`. It needs onnxruntime, numpy and Pillow only, and uses the GPU when "
        "onnxruntime-gpu is installed (`pip install 'jointdistill[gpu]'`).",
        "",
        "## Lineage and limits",
        "",
        f"- params digest `{record.get('params_digest')}`, data checksum `{record.get('data_checksum')}`, "
        f"code digest `{str(report.get('code'))[:23]}`, jointdistill {__version__}, opset {report['opset']}.",
        f"- Trained on `{meta['dataset']}` at {h}×{w}; accuracy on other domains, or far from that size, is "
        "unmeasured.",
        "- Depth is metric only for cameras like the training camera (focal length, height).",
    ]
    if meta["dataset"] == "synthetic":
        lines.append("- The synthetic street scenes exercise the pipeline; this model is not meant for real photos.")
    return "\n".join(lines) + "\n"
