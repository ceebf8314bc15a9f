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
from jointdistill.evaluation import templates
from jointdistill.evaluation.report import render
from jointdistill.evaluation.scoring import score_model, score_session
from jointdistill.io import atomic_dir, atomic_write_text, write_json
from jointdistill.models import TASKS
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
    size, multiple = _input_size(cfg, record, meta, int(model.feature_stride))
    val, test = PreparedDataset(data, "val"), PreparedDataset(data, "test")
    if len(val) < 2:
        raise DataError(f"{data}: export needs at least 2 val images (parity and the example batch), found {len(val)}")
    n_parity = len(val) if cfg.parity_images == 0 else min(cfg.parity_images, len(val))
    rng = np.random.default_rng(params.seed)
    code = codeid.source_digest(__name__)
    failed_report = out.parent / f"{out.name}.parity-failed.json"
    torch.manual_seed(params.seed)

    with atomic_dir(out) as tmp:
        parents = {"prepared": data, "student": student}
        lineage.write(tmp, lineage.record("export", params.digest("export"), parents, module=__name__))
        onnx_path = tmp / "student.onnx"
        t0 = time.perf_counter()
        export_onnx(model, torch.stack([val[0]["image"], val[1]["image"]]), onnx_path, cfg.opset, multiple)
        set_metadata(onnx_path, metadata_props(record, meta, multiple, cfg.opset, "fp32", code))
        check_graph(onnx_path)
        export_seconds = time.perf_counter() - t0
        session = StudentSession(onnx_path, "cpu")
        parity = check_parity(model, session, _batches(val, n_parity, cfg.batch_size), size, multiple, rng, cfg)
        if not parity["passed"]:
            write_json(failed_report, parity)
            raise ModelError(
                f"export: onnxruntime does not match PyTorch ({'; '.join(parity['problems'])}); nothing was "
                f"written to {out}; the full comparison is in {failed_report}"
            )
        v = parity["fp32"]["val"]
        log.info(
            "export: parity on %d val images: depth max rel err %.2e, seg argmax agreement %.5f",
            v["images"],
            v["depth"]["max_rel_err"],
            v["segmentation_logits"]["argmax_agreement"],
        )
        n_cls, ignore = len(meta["classes"]), int(meta["ignore_index"])
        pytorch = score_model(model, TASKS, test, n_cls, ignore, cfg.batch_size, torch.device("cpu")).metrics
        test_metrics = {"pytorch": {k: v for k, v in pytorch.items() if k in METRIC_KEYS}}
        test_metrics["onnx"] = _test_metrics(session, test, cfg.batch_size, n_cls, ignore)
        latency = {
            "pytorch": _latency(lambda x: eager_outputs(model, x), size, cfg.latency_runs, rng),
            "onnx": _latency(session.run, size, cfg.latency_runs, rng),
        }
        files = {"fp32": onnx_path}
        for name, path in _write_variants(tmp, onnx_path, cfg, val, record, meta, multiple, code):
            vs = StudentSession(path, "cpu")
            val_parity = _compare(model, vs, _batches(val, n_parity, cfg.batch_size))
            parity["variants"][name] = {"file": path.name, "val": val_parity}
            test_metrics[name] = _test_metrics(vs, test, cfg.batch_size, n_cls, ignore)
            latency[name] = _latency(vs.run, size, cfg.latency_runs, rng)
            files[name] = path
            del vs

        sizes = {name: p.stat().st_size for name, p in files.items()}
        seconds = (export_seconds, time.perf_counter() - t_start)
        report = ExportResult.from_run(
            cfg, record, test_metrics, latency, sizes, seconds, code, _flops(model, student, size)
        )
        write_json(tmp / "parity.json", parity)
        content, run_facts = records.split(report)
        write_json(tmp / records.REPORT, content)
        atomic_write_text(tmp / "MODEL_CARD.md", model_card(record, meta, parity, content, multiple))
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, curated(report), run_facts)
    failed_report.unlink(missing_ok=True)
    result = ExportResult({"parity": parity, **report})
    log.info("export: %s: %s", out / "student.onnx", result.headline())
    return result


def _input_size(cfg, record: dict, meta: dict, stride: int) -> tuple[tuple[int, int], int | None]:
    """The training size, and the multiple H and W must keep in the exported graph (None: fixed to that size)."""
    h, w = (int(v) for v in (record.get("resolution") or meta["resolution"]))
    multiple = stride if cfg.dynamic_size and h % stride == 0 and w % stride == 0 else None
    if cfg.dynamic_size and multiple is None:
        log.warning("export: training size %s×%s is not a multiple of %d; H and W are fixed to it", h, w, stride)
    return (h, w), multiple


def check_parity(model, session, val_batches, size, multiple, rng, cfg) -> dict[str, Any]:
    """onnxruntime against PyTorch on val images, random inputs and other shapes, judged by the tolerances."""
    tolerance = {"depth_rel_tol": cfg.depth_rel_tol, "seg_agreement_min": cfg.seg_agreement_min}
    fp32: dict[str, Any] = {
        "val": _compare(model, session, val_batches),
        "random": _compare(model, session, [rng.standard_normal((2, 3, *size), dtype=np.float32) for _ in range(2)]),
        "shapes": _shape_checks(model, session, size, multiple, rng),
    }
    problems = [f"{group}: {p}" for group in ("val", "random") for p in parity_problems(fp32[group], **tolerance)]
    problems += [f"shape {row['shape']}: {p}" for row in fp32["shapes"] for p in parity_problems(row, **tolerance)]
    return {
        "passed": not problems,
        "problems": problems,
        "tolerance": tolerance,
        "size_multiple": multiple,
        "input_size": list(size),
        "fp32": fp32,
        "variants": {},
    }


def _write_variants(tmp: Path, onnx_path: Path, cfg, val, record, meta, multiple, code):
    """The optional fp16 / int8 files beside student.onnx, each with its metadata and a checked graph:
    yields (variant, path)."""
    variants = []
    if cfg.fp16:
        variants.append(("fp16", "fp16", lambda dst: fp16_variant(onnx_path, dst)))
    if cfg.int8 != "none":
        calibration = _batches(val, min(cfg.calibration_images, len(val)), cfg.batch_size)
        variants.append((f"int8-{cfg.int8}", "int8", lambda dst: int8_variant(onnx_path, dst, cfg.int8, calibration)))
    for name, suffix, build in variants:
        path = tmp / f"student.{suffix}.onnx"
        build(path)
        set_metadata(path, metadata_props(record, meta, multiple, cfg.opset, name, code))
        check_graph(path)
        yield name, path


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
    """MODEL_CARD.md, from its template (`evaluation.templates.MODEL_CARD`)."""
    h, w = parity["input_size"]
    use = {
        "fp32": "reference; CPU and GPU",
        "fp16": "GPUs (CUDA execution provider)",
        "int8-dynamic": "CPU, smaller",
        "int8-static": "CPU, smaller and faster",
    }
    labels = {"pytorch": "PyTorch eager (fp32)", "onnx": "`student.onnx` in onnxruntime"}
    flops = report.get("flops") or {}
    context = {
        "record": record,
        "meta": meta,
        "config": record.get("config", {}),
        "norm": record.get("normalization") or meta["normalization"],
        "h": h,
        "w": w,
        "size_rule": f"any height and width that are multiples of {multiple} (trained at {h}×{w}; best accuracy "
        "near it)"
        if multiple
        else f"exactly {h}×{w}",
        "files": [
            {
                "file": "student.onnx" if name == "fp32" else parity["variants"][name]["file"],
                "name": name,
                "bytes": size,
                "use": use.get(name, ""),
            }
            for name, size in report["file_bytes"].items()
        ],
        "classes": [(name, tuple(c)) for name, c in zip(meta["classes"], record["palette"], strict=True)],
        "accuracy": [
            (labels.get(name, f"`{name}` variant"), {k: t.get(k) for k in METRIC_KEYS})
            for name, t in report["test_by_model"].items()
        ],
        "parity": parity,
        "shapes": ", ".join("×".join(map(str, r["shape"])) for r in parity["fp32"]["shapes"]),
        "flops": flops,
        "teacher_flops": {k.removeprefix("teacher_"): v for k, v in flops.items() if k.startswith("teacher_")},
        "code": str(report.get("code")),
        "report": report,
        "version": __version__,
    }
    return render(templates.MODEL_CARD, **context)
