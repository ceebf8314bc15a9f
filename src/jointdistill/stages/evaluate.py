"""The `evaluate` stage: the student and both teachers (and, if given, an MTL baseline) on one split, with the
engine's exact metrics and Δm; plot data for `dvc plots`, pictures, and a report (Markdown + one HTML file).

Outputs (``out``): ``report.json`` ({model: {split: metrics}}; Δm in the student's), ``report.md``,
``report.html`` (self-contained) and ``plots/`` (CSV for `dvc plots show`, PNG for people); in the metrics folder
``metrics.json`` (the student's test metrics, Δm, FLOPs ratio) and ``run.json`` (latency; see `records`). Neither the
report nor metrics.json holds a timing, so both are the same for the same inputs.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jointdistill.config import Params
from jointdistill.data.contract import open_split, verify_prepared
from jointdistill.data.prepared import PreparedDataset
from jointdistill.errors import DataError
from jointdistill.evaluation import plots, templates
from jointdistill.evaluation import report as rp
from jointdistill.evaluation.gate import capacity_gate, gate_failure
from jointdistill.evaluation.scoring import DELTA_M_METRICS, delta_m, depth_edges, score_model
from jointdistill.io import atomic_dir, write_json
from jointdistill.models import TASKS
from jointdistill.models.checked import load_student, load_teacher
from jointdistill.provenance import lineage, records
from jointdistill.stages.results import EvaluationResult
from jointdistill.training.devices import resolve_device

log = logging.getLogger(__name__)
SHOWN = ("miou", "pixacc", "abs_err", "rel_err", "delta1")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


MTL_BASELINE = "mtl"  # the report's key of the optional plain multi-task baseline (`--mtl`)


def run(
    params: Params,
    data: str | Path,
    teachers: tuple[str | Path, str | Path],
    student: str | Path,
    out: str | Path,
    mtl: str | Path | None = None,
    metrics_dir: str | Path | None = None,
) -> EvaluationResult:
    cfg = params.evaluate
    data, out, student = Path(data), Path(out), Path(student)
    t_start = time.perf_counter()
    meta = verify_prepared(data)
    models, s_record = _load_models(student, teachers, mtl, meta)
    ds = PreparedDataset(data, cfg.split)
    if len(ds) == 0:
        raise DataError(f"{data}: split {cfg.split!r} is empty")
    device = resolve_device(cfg.device)
    lo, hi = meta.get("depth_range") or (0.5, params.prepare.max_depth)
    keep = min(cfg.qualitative_images, len(ds))
    res = {
        name: score_model(
            model,
            tasks,
            ds,
            len(meta["classes"]),
            meta["ignore_index"],
            cfg.batch_size,
            device,
            depth_edges(lo, hi, cfg.depth_bins),
            keep=keep if name == "student" else 0,
        )
        for name, (model, tasks) in models.items()
    }
    s_info = _read_json(student / "report.json") or {}
    metrics = compare_models(res, meta["classes"], cfg.split, s_info)
    networks = {name: models[name][0] for name in ("student", "teacher_seg", "teacher_depth")}
    metrics["cost"] = inference_cost(networks, tuple(meta["resolution"]), device)
    weights_rows = _read_rows(student / "weights.csv")

    with atomic_dir(out) as tmp:
        parents = {"prepared": data, "teacher_seg": teachers[0], "teacher_depth": teachers[1], "student": student}
        lineage.write(tmp, lineage.record("evaluate", params.digest("evaluate"), parents, module=__name__))
        write_plot_data(tmp / "plots", res, meta["classes"], weights_rows, s_info)
        trajectory = _read_trajectory(student / "trajectory.parquet")
        figs = draw_figures(
            tmp / "plots", res, data, meta, cfg.split, keep, hi, weights_rows, trajectory, s_info, models["student"][0]
        )
        metrics["evaluate_seconds"] = round(time.perf_counter() - t_start, 2)
        content, run_facts = records.split(metrics)
        write_json(tmp / records.REPORT, content)
        context = report_context(params, meta, data, content, cfg.split, s_record, s_info, teachers, figs)
        markdown = rp.render(templates.EVALUATION, **context)
        (tmp / "report.md").write_text(markdown)
        (tmp / "report.html").write_text(rp.markdown_to_html(markdown, tmp))
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, curated(metrics), run_facts)
    log.info(
        "evaluate: student Δm %+.2f %% vs the teachers on %s → %s",
        content["student"][cfg.split]["delta_m"],
        cfg.split,
        out,
    )
    return EvaluationResult(metrics)


def _load_models(student: Path, teachers, mtl, meta: dict) -> tuple[dict, dict]:
    """Every model compared, checked against the data, with the tasks it is scored on: ({name: (model, tasks)},
    the student's record)."""
    s_model, s_record = load_student(student, meta)
    models = {
        "student": (s_model, TASKS),
        "teacher_seg": (load_teacher(teachers[0], "seg", meta)[0], ("seg",)),
        "teacher_depth": (load_teacher(teachers[1], "depth", meta)[0], ("depth",)),
    }
    if mtl:
        models[MTL_BASELINE] = (load_student(mtl, meta, "mtl baseline")[0], TASKS)
    return models, s_record


def compare_models(res: dict, classes: list[str], split: str, s_info: dict) -> dict:
    """The report's numbers: each model's metrics on ``split`` (per-class IoU by name, the confusion matrix), Δm of
    the multi-task models against the teachers, and with an MTL baseline Δm against it and the capacity gate."""
    reference = {
        **{k: res["teacher_seg"].metrics[k] for k in ("miou", "pixacc")},
        **{k: res["teacher_depth"].metrics[k] for k in ("abs_err", "rel_err")},
    }
    metrics: dict = {}
    for name, r in res.items():
        m = {k: v for k, v in r.metrics.items() if k != "per_class_iou"}
        if "per_class_iou" in r.metrics:
            m["per_class_iou"] = dict(zip(classes, r.metrics["per_class_iou"], strict=True))
        if r.confusion is not None:  # pixel counts, rows: ground truth, columns: prediction (Kubeflow's widget)
            m["confusion_matrix"] = np.asarray(r.confusion).astype(int).tolist()
        if name in ("student", MTL_BASELINE):
            m["delta_m"] = delta_m(r.metrics, reference)
        metrics[name] = {split: m}
    if MTL_BASELINE in res:
        baseline = res[MTL_BASELINE].metrics
        metrics["student"][split]["delta_m_vs_mtl"] = delta_m(res["student"].metrics, baseline)
        metrics["gate"] = capacity_gate(reference, baseline)
        # Frames missing a label the student learnt from (a label budget): then the gate does not bound
        # distillation.
        metrics["gate"]["unlabelled"] = int((s_info.get("data") or {}).get("pool", 0))
    metrics["reference"] = {split: reference}
    return metrics


def write_plot_data(pdir: Path, res: dict, classes: list[str], weights_rows: list[dict], s_info: dict) -> None:
    """The CSV files `dvc plots show` draws. One file per model: DVC draws one colour (bars side by side, one
    line) per file, where rows of several models in one file would be stacked into one bar or joined into one
    zig-zag line."""
    for sub in ("per_class_iou", "depth_error"):
        (pdir / sub).mkdir(parents=True)
    for name, r in res.items():
        if "per_class_iou" in r.metrics:
            rows = [{"class": c, "iou": r.metrics["per_class_iou"][i] or 0.0} for i, c in enumerate(classes)]
            _write_csv(pdir / "per_class_iou" / f"{name}.csv", rows, ["class", "iou"])
        if r.depth_bins:
            fields = ["distance_m", "from_m", "to_m", "pixels", "abs_err", "rel_err"]
            _write_csv(pdir / "depth_error" / f"{name}.csv", r.depth_bins, fields)
    fields = ["timeframe", "omega_seg", "omega_depth", "feedback_seg", "feedback_depth"]
    fields += ["noise_seg", "noise_depth", "z_seg", "z_depth"]
    _write_csv(pdir / "weights.csv", _weights_wide(weights_rows), fields)
    fields = ["timeframe", "train_traj_loss", "l1_at_points", "l1_values", "overlap"]
    _write_csv(pdir / "trajectory_loss.csv", _trajectory_rows(s_info), fields)


def draw_figures(
    pdir, res, data, meta, split, keep, max_depth, weights_rows, trajectory, s_info, student_model
) -> dict:
    """The report's pictures (PNG in ``pdir``): {figure: path}; how many examples the qualitative grid shows and
    the probe image the trajectory is drawn on."""
    palette, ignore, classes = meta["palette"], meta["ignore_index"], meta["classes"]
    figs: dict[str, Any] = {}
    if keep:
        raw = open_split(data, split, meta)
        figs["qualitative"] = plots.qualitative_grid(
            [np.asarray(raw["images"][i]) for i in range(keep)],
            [np.asarray(raw["labels"][i]) for i in range(keep)],
            res["student"].samples["seg"],
            [np.asarray(raw["depth"][i]) for i in range(keep)],
            res["student"].samples["depth"],
            palette,
            max_depth,
            pdir / "qualitative.png",
            ignore,
        )
        figs["examples"] = len(res["student"].samples["seg"])
    figs["confusion"] = plots.confusion_matrix(res["student"].confusion, classes, pdir / "confusion.png")
    per_class = {n: r.metrics["per_class_iou"] for n, r in res.items() if "per_class_iou" in r.metrics}
    figs["per_class"] = plots.per_class_iou(per_class, classes, pdir / "per_class_iou.png")
    depth_bins = {n: r.depth_bins for n, r in res.items() if r.depth_bins}
    figs["depth_error"] = plots.depth_error_by_distance(depth_bins, pdir / "depth_error.png")
    if weights_rows:
        figs["weights"] = plots.teacher_weights(weights_rows, pdir / "weights.png")
    if trajectory is not None and len(trajectory):
        image_id = int(trajectory["image"].min())
        probes = open_split(data, "train", meta)  # the probe images are train images
        grid = tuple(s_info.get("trajectory", {}).get("grid") or _grid_of(student_model, meta))
        figs["trajectory"] = plots.trajectory(
            np.asarray(probes["images"][image_id]),
            trajectory[trajectory["image"] == image_id],
            grid,
            pdir / "trajectory.png",
        )
        figs["trajectory_image"] = image_id
    return figs


def report_context(params, meta, data, metrics, split, s_record, s_info, teachers, figs) -> dict:
    """What the evaluation report's template shows (`evaluation.templates.EVALUATION`)."""
    mode = s_record.get("mode", "?")
    names = {
        "teacher_seg": "seg teacher",
        "teacher_depth": "depth teacher",
        MTL_BASELINE: "MTL baseline",
        "student": f"student ({mode})",
    }
    per = {n: metrics[n][split]["per_class_iou"] for n in ("teacher_seg", MTL_BASELINE, "student") if n in metrics}
    gate = metrics.get("gate")
    tr = s_info.get("trajectory", {})
    per_tf = tr.get("per_timeframe", [])
    models = []
    for name, info in (
        ("seg teacher", _read_json(Path(teachers[0]) / "report.json") or {}),
        ("depth teacher", _read_json(Path(teachers[1]) / "report.json") or {}),
        (f"student ({mode})", s_info),
    ):
        mod = info.get("model", {})
        models.append(
            [name, *(mod.get(k, "?") for k in ("backbone", "head", "parameters")), info.get("best_epoch", "?")]
        )
    return {
        "mode": mode,
        "split": split,
        "st": metrics["student"][split],
        "shown": SHOWN,
        "rows": [
            (names[n], metrics[n][split])
            for n in ("teacher_seg", "teacher_depth", MTL_BASELINE, "student")
            if n in metrics
        ],
        "gate": gate,
        "gate_failure": gate_failure(gate.get("unlabelled", 0)) if gate else "",
        "cost": metrics["cost"],
        "delta_m_metrics": DELTA_M_METRICS,
        "per_class_models": [names[n] for n in per],
        "per_class_rows": [[c, *(rp.fmt(per[n][c]) for n in per)] for c in meta["classes"]],
        "examples": figs.get("examples", 0),
        "final_weights": s_info.get("weights", {}).get("final", {}) if "weights" in figs else None,
        "trajectory": {
            **{k: tr.get(k) for k in ("top_k", "rows", "bytes")},
            "storage_ratio": tr.get("storage_ratio") or 0,
            "image": figs.get("trajectory_image"),
            "per_timeframe": per_tf if per_tf and "l1_at_points" in per_tf[0] else [],
        }
        if "trajectory" in figs
        else None,
        "data": data,
        "meta": meta,
        "models": models,
        "params_yaml": yaml.safe_dump(params.stage_params("evaluate"), sort_keys=False).rstrip("\n"),
    }


def curated(metrics: dict) -> dict:
    """The evaluation's few numbers for metrics.json: the student on the split, Δm, its FLOPs against the
    teachers'; with an MTL baseline, Δm against it. Only numbers the inputs determine: DVC restores a stage from
    its run cache only when this file, an uncached out, equals the cached run's (latency is in run.json)."""
    split = next(iter(metrics["student"]))
    s, cost = metrics["student"][split], metrics["cost"]
    out = {k: s[k] for k in (*SHOWN, "delta_m")}
    out["flops_ratio"] = cost["student_flops_vs_teachers"]
    if "delta_m_vs_mtl" in s:
        out["delta_m_vs_mtl"] = s["delta_m_vs_mtl"]
    return out


def inference_cost(models: dict, size: tuple[int, int], device, runs: int = 5) -> dict:
    """FLOPs of one image at the training size, and PyTorch latency at batch 1 (median of ``runs``), per model;
    and the student's share of the two teachers' together."""
    import statistics

    import torch

    from jointdistill.models import model_flops

    out: dict = {"flops": {}, "latency_ms": {}}
    x = torch.zeros(1, 3, *size, device=device)
    for name, m in models.items():
        m = m.to(device).eval()
        out["flops"][name] = model_flops(m, *size)
        times = []
        with torch.no_grad():
            m(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                m(x)
                times.append(1000 * (time.perf_counter() - t0))
        out["latency_ms"][name] = statistics.median(times)
    teachers = [n for n in models if n.startswith("teacher")]
    out["student_flops_vs_teachers"] = out["flops"]["student"] / sum(out["flops"][n] for n in teachers)
    out["student_latency_vs_teachers"] = out["latency_ms"]["student"] / sum(out["latency_ms"][n] for n in teachers)
    out["teacher_flops_vs_student"] = {n: out["flops"][n] / out["flops"]["student"] for n in teachers}
    return out


def _grid_of(model, meta) -> tuple[int, int]:
    import torch

    h, w = meta["resolution"]
    with torch.no_grad():
        return tuple(model.encode(torch.zeros(1, 3, h, w)).shape[-2:])


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_trajectory(path: Path):
    if not path.exists():
        return None
    import pandas as pd

    return pd.read_parquet(path)


def _weights_wide(rows: list[dict]) -> list[dict]:
    by_tf: dict[int, dict] = {}
    for r in rows:
        d = by_tf.setdefault(int(r["timeframe"]), {"timeframe": int(r["timeframe"])})
        d[f"omega_{r['task']}"] = float(r["omega"])
        for key in ("feedback", "noise", "z"):
            d[f"{key}_{r['task']}"] = float(r[key]) if r.get(key) not in ("", None) else ""
    return [by_tf[k] for k in sorted(by_tf)]


def _trajectory_rows(s_info: dict) -> list[dict]:
    frames = {f["timeframe"]: dict(f) for f in s_info.get("trajectory", {}).get("per_timeframe", [])}
    for i, h in enumerate(s_info.get("history", []), start=1):
        if "train/traj" in h:
            frames.setdefault(i, {"timeframe": i})["train_traj_loss"] = h["train/traj"]
    return [frames[k] for k in sorted(frames) if "l1_at_points" in frames[k] or "train_traj_loss" in frames[k]]
