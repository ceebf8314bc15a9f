"""The ablation study (DESIGN §4 modes), run in-process: for every seed, both teachers and one student per
distillation mode on the same prepared data, each evaluated on test; then one table, mean ± std over seeds,
rows = modes, columns = mIoU, pixAcc, AbsErr, RelErr, Δm (against that seed's teachers).

``single`` is the teachers themselves (seg metrics from the seg teacher, depth metrics from the depth teacher;
Δm = 0 by definition). A KD mode with ``+cache`` (e.g. ``full+cache``) is that mode with
``distill.teacher_cache`` on, sharing one cache per seed: what the cache costs in accuracy. The seed changes
initialisation, data order and augmentation, never the data. Every run is a normal stage output under
``out/runs/seed-S/``; a run already finished with the same params is reused, and an interrupted one resumes
from its checkpoint, so a killed ablation picks up where it stopped."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path

from .. import plots
from ..config import Params, params_from_dict
from ..data.contract import verify_prepared
from ..data.prepared import PreparedDataset
from ..engine import resolve_device
from ..errors import ConfigError
from ..evaluation import delta_m, evaluate_model
from ..io import atomic_write_text, write_json
from ..models import load_model
from . import distill, teacher

log = logging.getLogger(__name__)
MODES = ("single", "mtl", "static_kd", "adaptive", "full")
CACHED = tuple(f"{m}+cache" for m in MODES[2:])
COLUMNS = ("miou", "pixacc", "abs_err", "rel_err", "delta_m")
LABELS = {"miou": "mIoU ↑", "pixacc": "pixAcc ↑", "abs_err": "AbsErr (m) ↓", "rel_err": "RelErr ↓", "delta_m": "Δm % ↑"}


def _done(folder: Path, digest: str) -> bool:
    try:
        return json.loads((folder / "metrics.json").read_text()).get("params_digest") == digest
    except (OSError, ValueError):
        return False


def _with(params: Params, **changes) -> Params:
    data = params.model_dump(mode="json")
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (data[section] if section else data)[name] = value
    return params_from_dict(data)


def run(params: Params, data: str | Path, out: str | Path, modes=MODES, seeds=(0, 1, 2)) -> list[dict]:
    """Run the ablation into ``out``; return the table rows (also written as ablation.{md,csv,png})."""
    unknown = [m for m in modes if m not in MODES + CACHED]
    if unknown or not modes:
        raise ConfigError(f"--modes: unknown {unknown} (choose from {', '.join(MODES + CACHED)})")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    data, out = Path(data), Path(out)
    meta = verify_prepared(data)
    test = PreparedDataset(data, "test")
    device = resolve_device(params.evaluate.device)
    n_cls, ignore = len(meta["classes"]), meta["ignore_index"]
    results: list[dict] = []
    for seed in seeds:
        base = _with(params, seed=seed)
        root = out / "runs" / f"seed-{seed}"
        for task in ("seg", "depth"):
            folder = root / "teachers" / task
            if not _done(folder, base.digest()):
                log.info("ablate: seed %d, %s teacher", seed, task)
                teacher.run(base, task, data, folder, root / "checkpoints" / f"teacher-{task}", resume=True)
        tm = {t: json.loads((root / "teachers" / t / "metrics.json").read_text())["test"] for t in ("seg", "depth")}
        reference = {"miou": tm["seg"]["miou"], "pixacc": tm["seg"]["pixacc"], "abs_err": tm["depth"]["abs_err"],
                     "rel_err": tm["depth"]["rel_err"]}
        for mode in modes:
            if mode == "single":
                results.append({"seed": seed, "mode": mode, **reference, "delta_m": 0.0})
                continue
            name, cached = mode.removesuffix("+cache"), mode.endswith("+cache")
            p = _with(base, **{"distill.mode": name, "distill.teacher_cache": cached})
            folder = root / mode
            if not _done(folder, p.digest()):
                log.info("ablate: seed %d, mode %s", seed, mode)
                teachers = None if name == "mtl" else (root / "teachers" / "seg", root / "teachers" / "depth")
                distill.run(p, data, teachers, folder, root / "checkpoints" / mode, resume=True,
                            teacher_cache=root / "teacher_cache")
            model, _ = load_model(folder / "student.pt")
            m = evaluate_model(model, ("seg", "depth"), test, n_cls, ignore, params.evaluate.batch_size,
                               device).metrics
            results.append({"seed": seed, "mode": mode, **{k: m[k] for k in COLUMNS[:4]},
                            "delta_m": delta_m(m, reference)})
    table = summarise(results, modes)
    write_outputs(out, results, table, seeds)
    return table


def summarise(results: list[dict], modes) -> list[dict]:
    """Mean and sample standard deviation over seeds per mode (std 0 for one seed)."""
    table = []
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        entry = {"mode": mode, "seeds": len(rows)}
        for key in COLUMNS:
            values = [r[key] for r in rows]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: list[dict], seeds) -> str:
    lines = [f"Ablation on test, mean ± std over seeds {', '.join(map(str, seeds))} "
             "(Δm against each seed's single-task teachers).", "",
             "| mode | " + " | ".join(LABELS[k] for k in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in table:
        cells = []
        for key in COLUMNS:
            digits = 2 if key in ("abs_err", "delta_m") else 4
            cells.append(f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}")
        lines.append(f"| {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: Path, results: list[dict], table: list[dict], seeds) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.md", markdown(table, seeds))
    atomic_write_text(out / "ablation.csv", _csv(table, list(table[0])))
    atomic_write_text(out / "runs.csv", _csv(results, ["seed", "mode", *COLUMNS]))
    write_json(out / "ablation.json", {"seeds": list(seeds), "table": table, "runs": results})
    plots.ablation_bars(table, list(COLUMNS), out / "ablation.png")
