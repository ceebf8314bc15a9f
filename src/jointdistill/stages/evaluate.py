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
from jointdistill.evaluation import plots
from jointdistill.evaluation import report as rp
from jointdistill.evaluation.gate import capacity_gate, gate_failure
from jointdistill.evaluation.scoring import DELTA_M_METRICS, delta_m, depth_edges, evaluate_model
from jointdistill.io import atomic_dir, write_json
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
    classes, palette, ignore = meta["classes"], meta["palette"], meta["ignore_index"]
    num_classes = len(classes)
    s_model, s_record = load_student(student, meta)
    t_seg, _ = load_teacher(teachers[0], "seg", meta)
    t_depth, _ = load_teacher(teachers[1], "depth", meta)
    m_model = load_student(mtl, meta, "mtl baseline")[0] if mtl else None
    ds = PreparedDataset(data, cfg.split)
    if len(ds) == 0:
        raise DataError(f"{data}: split {cfg.split!r} is empty")
    device = resolve_device(cfg.device)
    lo, hi = meta.get("depth_range") or (0.5, params.prepare.max_depth)
    edges = depth_edges(lo, hi, cfg.depth_bins)
    keep = min(cfg.qualitative_images, len(ds))

    def ev(model, tasks, k=0):
        return evaluate_model(model, tasks, ds, num_classes, ignore, cfg.batch_size, device, edges, keep=k)

    res = {
        "student": ev(s_model, ("seg", "depth"), keep),
        "teacher_seg": ev(t_seg, ("seg",)),
        "teacher_depth": ev(t_depth, ("depth",)),
    }
    if m_model is not None:
        res["mtl"] = ev(m_model, ("seg", "depth"))
    reference = {
        **{k: res["teacher_seg"].metrics[k] for k in ("miou", "pixacc")},
        **{k: res["teacher_depth"].metrics[k] for k in ("abs_err", "rel_err")},
    }

    split = cfg.split
    metrics: dict = {}
    for name, r in res.items():
        m = {k: v for k, v in r.metrics.items() if k != "per_class_iou"}
        if "per_class_iou" in r.metrics:
            m["per_class_iou"] = dict(zip(classes, r.metrics["per_class_iou"], strict=True))
        if r.confusion is not None:  # pixel counts, rows: ground truth, columns: prediction (Kubeflow's widget)
            m["confusion_matrix"] = np.asarray(r.confusion).astype(int).tolist()
        if name in ("student", "mtl"):
            m["delta_m"] = delta_m(r.metrics, reference)
        metrics[name] = {split: m}
    s_info = _read_json(student / "report.json") or {}
    if "mtl" in res:
        metrics["student"][split]["delta_m_vs_mtl"] = delta_m(res["student"].metrics, res["mtl"].metrics)
        metrics["gate"] = capacity_gate(reference, res["mtl"].metrics)
        # Unlabelled frames the student learnt from (a label budget): then the gate does not bound distillation.
        metrics["gate"]["unlabelled"] = int((s_info.get("data") or {}).get("unlabelled", 0))
    metrics["reference"] = {split: reference}
    metrics["cost"] = inference_cost(
        {"student": s_model, "teacher_seg": t_seg, "teacher_depth": t_depth}, tuple(meta["resolution"]), device
    )

    weights_rows = _read_rows(student / "weights.csv")
    trajectory = _read_trajectory(student / "trajectory.parquet")

    with atomic_dir(out) as tmp:
        parents = {"prepared": data, "teacher_seg": teachers[0], "teacher_depth": teachers[1], "student": student}
        lineage.write(tmp, lineage.record("evaluate", params.digest("evaluate"), parents, module=__name__))
        pdir = tmp / "plots"
        pdir.mkdir()
        # --- plot data for `dvc plots show`
        # One file per model: DVC draws one colour (bars side by side, one line) per file, where rows of several
        # models in one file would be stacked into one bar or joined into one zig-zag line.
        (pdir / "per_class_iou").mkdir()
        (pdir / "depth_error").mkdir()
        for name, r in res.items():
            if "per_class_iou" in r.metrics:
                _write_csv(
                    pdir / "per_class_iou" / f"{name}.csv",
                    [{"class": c, "iou": r.metrics["per_class_iou"][i] or 0.0} for i, c in enumerate(classes)],
                    ["class", "iou"],
                )
            if r.depth_bins:
                _write_csv(
                    pdir / "depth_error" / f"{name}.csv",
                    r.depth_bins,
                    ["distance_m", "from_m", "to_m", "pixels", "abs_err", "rel_err"],
                )
        wide = _weights_wide(weights_rows)
        _write_csv(
            pdir / "weights.csv", wide, ["timeframe", "omega_seg", "omega_depth", "feedback_seg", "feedback_depth"]
        )
        traj_rows = _trajectory_rows(s_info)
        _write_csv(
            pdir / "trajectory_loss.csv",
            traj_rows,
            ["timeframe", "train_traj_loss", "l1_at_points", "l1_values", "overlap"],
        )

        # --- pictures
        raw = open_split(data, split, meta)
        idx = list(range(keep))
        figs: dict[str, Any] = {}
        if keep:
            figs["qualitative"] = plots.qualitative_grid(
                [np.asarray(raw["images"][i]) for i in idx],
                [np.asarray(raw["labels"][i]) for i in idx],
                res["student"].samples["seg"],
                [np.asarray(raw["depth"][i]) for i in idx],
                res["student"].samples["depth"],
                palette,
                hi,
                pdir / "qualitative.png",
                ignore,
            )
        figs["confusion"] = plots.confusion_matrix(res["student"].confusion, classes, pdir / "confusion.png")
        figs["per_class"] = plots.per_class_iou(
            {n: r.metrics["per_class_iou"] for n, r in res.items() if "per_class_iou" in r.metrics},
            classes,
            pdir / "per_class_iou.png",
        )
        figs["depth_error"] = plots.depth_error_by_distance(
            {n: r.depth_bins for n, r in res.items() if r.depth_bins}, pdir / "depth_error.png"
        )
        if weights_rows:
            figs["weights"] = plots.teacher_weights(weights_rows, pdir / "weights.png")
        if trajectory is not None and len(trajectory):
            image_id = int(trajectory["image"].min())
            probes = open_split(data, "train", meta)  # the probe images are train images
            grid = tuple(s_info.get("trajectory", {}).get("grid") or _grid_of(s_model, meta))
            figs["trajectory"] = plots.trajectory(
                np.asarray(probes["images"][image_id]),
                trajectory[trajectory["image"] == image_id],
                grid,
                pdir / "trajectory.png",
            )
            figs["trajectory_image"] = image_id

        metrics["evaluate_seconds"] = round(time.perf_counter() - t_start, 2)
        content, run_facts = records.split(metrics)
        write_json(tmp / records.REPORT, content)
        blocks = _report_blocks(
            params, meta, data, res, content, split, reference, s_record, s_info, teachers, figs, weights_rows, tmp
        )
        title = "jointdistill — evaluation report"
        (tmp / "report.md").write_text(rp.to_markdown(title, blocks, tmp))
        (tmp / "report.html").write_text(rp.to_html(title, blocks))
        with records.folder(tmp, metrics_dir) as mdir:
            records.write(mdir, curated(metrics), run_facts)
    log.info(
        "evaluate: student Δm %+.2f %% vs the teachers on %s → %s", metrics["student"][split]["delta_m"], split, out
    )
    return EvaluationResult(metrics)


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
        d[f"feedback_{r['task']}"] = float(r["feedback"]) if r["feedback"] not in ("", None) else ""
    return [by_tf[k] for k in sorted(by_tf)]


def _trajectory_rows(s_info: dict) -> list[dict]:
    frames = {f["timeframe"]: dict(f) for f in s_info.get("trajectory", {}).get("per_timeframe", [])}
    for i, h in enumerate(s_info.get("history", []), start=1):
        if "train/traj" in h:
            frames.setdefault(i, {"timeframe": i})["train_traj_loss"] = h["train/traj"]
    return [frames[k] for k in sorted(frames) if "l1_at_points" in frames[k] or "train_traj_loss" in frames[k]]


def _report_blocks(
    params, meta, data, res, metrics, split, reference, s_record, s_info, teachers, figs, weights_rows, root
) -> list:
    b = []
    st = metrics["student"][split]
    mode = s_record.get("mode", "?")
    verdict = "better" if st["delta_m"] > 0 else "worse"
    lead = (
        f"The **{mode}** student scores Δm = **{st['delta_m']:+.2f} %** against the two single-task teachers on "
        f"`{split}` ({verdict} on average over mIoU, pixel accuracy, AbsErr and RelErr)"
    )
    if "delta_m_vs_mtl" in st:
        lead += f", and Δm = **{st['delta_m_vs_mtl']:+.2f} %** against the MTL baseline"
    b.append(rp.text(lead + ".", lead=True))

    b.append(rp.heading("Metrics"))
    header = ["model", "mIoU ↑", "pixAcc ↑", "AbsErr (m) ↓", "RelErr ↓", "δ<1.25 ↑", "Δm vs teachers"]
    rows = []
    names = {
        "teacher_seg": "seg teacher",
        "teacher_depth": "depth teacher",
        "mtl": "MTL baseline",
        "student": f"student ({mode})",
    }
    for name in ("teacher_seg", "teacher_depth", "mtl", "student"):
        if name not in res:
            continue
        m = metrics[name][split]
        rows.append(
            [
                names[name],
                *(rp.fmt(m.get(k)) for k in SHOWN),
                f"{m['delta_m']:+.2f} %" if "delta_m" in m else "(reference)",
            ]
        )
    b.append(rp.table(header, rows))
    gate = metrics.get("gate")
    if gate is None:
        b.append(
            rp.text(
                "Can this benchmark show distillation? Only if the teachers beat plain multi-task training "
                "by at least 5 mIoU points and 5 % AbsErr: give an MTL baseline (`--mtl`) to check it "
                "here, or run `jointdistill ablate`, which checks it for every seed."
            )
        )
    elif gate["passed"]:
        b.append(
            rp.text(
                f"Gate passed: the teachers beat the MTL baseline by {gate['miou_points']:.1f} mIoU points "
                f"and {gate['abs_err_percent']:.1f} % AbsErr (needed: 5 and 5), so this benchmark can show "
                "distillation."
            )
        )
    else:
        b.append(
            rp.text(
                f"Gate failed: the teachers beat the MTL baseline by only {gate['miou_points']:.1f} mIoU "
                f"points and {gate['abs_err_percent']:.1f} % AbsErr (needed: 5 and 5)"
                f"{gate_failure(gate.get('unlabelled', 0))}."
            )
        )
    cost = metrics["cost"]
    b.append(
        rp.text(
            f"Cost: the student needs {cost['flops']['student'] / 1e9:.2f} GFLOP per image, "
            f"{100 * cost['student_flops_vs_teachers']:.0f} % of the two teachers' together "
            f"({cost['flops']['teacher_seg'] / 1e9:.2f} and {cost['flops']['teacher_depth'] / 1e9:.2f}). "
            "Latency, measured on the machine that ran this, is in the stage's run.json."
        )
    )
    b.append(
        rp.text(
            f"Δm = (1/4)·Σ_k (−1)^l_k·(M_k − M_ref,k)/M_ref,k·100 over {', '.join(DELTA_M_METRICS)}; "
            "l_k = 1 where lower is better; the reference is the seg teacher's mIoU/pixAcc and the depth "
            "teacher's AbsErr/RelErr. Exact metrics over the whole split (one confusion matrix, pixel sums)."
        )
    )
    b.append(rp.heading("Per-class IoU", 3))
    per = {n: metrics[n][split]["per_class_iou"] for n in ("teacher_seg", "mtl", "student") if n in res}
    b.append(
        rp.table(["class", *[names[n] for n in per]], [[c, *(rp.fmt(per[n][c]) for n in per)] for c in meta["classes"]])
    )
    b.append(rp.image(figs["per_class"], "IoU per class on the test split"))
    b.append(rp.image(figs["confusion"], "student confusion matrix (rows: ground truth)"))
    b.append(rp.image(figs["depth_error"], "depth AbsErr against ground-truth distance"))
    if "qualitative" in figs:
        b.append(rp.heading("Examples"))
        b.append(rp.image(figs["qualitative"], f"the first {len(res['student'].samples['seg'])} {split} images"))

    b.append(rp.heading("How the student learned"))
    if weights_rows:
        final = s_info.get("weights", {}).get("final", {})
        b.append(
            rp.text(
                "Teacher weights ω are updated after each timeframe from the feedback a = student score / "
                "teacher score on val (mIoU; 1/AbsErr). Final ω: "
                + ", ".join(f"{k} {v:.3f}" for k, v in final.items())
                + "."
            )
        )
        b.append(rp.image(figs["weights"], "teacher weights and feedback over timeframes"))
    if "trajectory" in figs:
        tr = s_info.get("trajectory", {})
        b.append(
            rp.text(
                f"Knowledge trajectory: top-{tr.get('top_k')} attention points of the connector (○) and "
                f"the student (×) on train probe image {figs['trajectory_image']}, per timeframe. Stored as "
                f"{tr.get('rows')} rows, {tr.get('bytes')} bytes ({100 * (tr.get('storage_ratio') or 0):.3f} "
                "% of the fused maps)."
            )
        )
        b.append(rp.image(figs["trajectory"], "essential points over timeframes"))
        per_tf = tr.get("per_timeframe", [])
        if per_tf and "l1_at_points" in per_tf[0]:
            b.append(
                rp.table(
                    ["timeframe", "L1 at connector points", "L1 of values by rank", "shared points"],
                    [
                        [f["timeframe"], rp.fmt(f["l1_at_points"]), rp.fmt(f["l1_values"]), rp.fmt(f["overlap"], 2)]
                        for f in per_tf
                    ],
                )
            )

    b.append(rp.heading("Data and models"))
    c = meta["counts"]
    b.append(
        rp.text(
            f"Data `{data}`: {meta['dataset']}, {meta['resolution'][0]}×{meta['resolution'][1]}, "
            f"train {c['train']} / val {c['val']} / test {c['test']}"
            + (f" / unlabelled {c['unlabelled']}" if c.get("unlabelled") else "")
            + f", classes: {', '.join(meta['classes'])}; "
            f"source checksum `{str(meta.get('source_checksum'))[:16]}`."
        )
    )
    mrows = []
    for name, folder in (("seg teacher", teachers[0]), ("depth teacher", teachers[1])):
        info = _read_json(Path(folder) / "report.json") or {}
        mod = info.get("model", {})
        mrows.append(
            [
                name,
                mod.get("backbone", "?"),
                mod.get("head", "?"),
                mod.get("parameters", "?"),
                info.get("best_epoch", "?"),
            ]
        )
    mod = s_info.get("model", {})
    mrows.append(
        [
            f"student ({mode})",
            mod.get("backbone", "?"),
            mod.get("head", "?"),
            mod.get("parameters", "?"),
            s_info.get("best_epoch", "?"),
        ]
    )
    b.append(rp.table(["model", "backbone", "head", "parameters", "best epoch"], mrows))
    b.append(rp.heading("Params"))
    b.append(rp.code(yaml.safe_dump(params.stage_params("evaluate"), sort_keys=False), "yaml"))
    return b
