"""The ablation study (modes single, mtl, self_train, static_kd, adaptive, full), run in-process: for every seed,
its prepared data (the seed draws the labelled frames of the budget; the test split never changes), both teachers
once and one student per mode trained from them, each evaluated on test; then one table, mean ± std over seeds,
rows = modes, columns = mIoU, pixAcc, AbsErr, RelErr, Δm (against that seed's teachers), and the paired
differences stated before any run (PAIRS: static_kd − mtl, static_kd − self_train, adaptive − static_kd, full −
adaptive, full − mtl): mean, 95 % t-interval and sign count over seeds, with no correction for testing several
pairs (each pair answers its own question; the table says so).

``single`` is the teachers themselves (seg metrics from the seg teacher, depth metrics from the depth teacher;
Δm = 0 by definition). A KD mode can carry variants after a ``+``: ``+cache`` / ``+live`` (``distill.
teacher_cache`` on / off: what the cache costs in accuracy), ``+progress`` / ``+deficit`` (the direction of
``distill.feedback``), ``+level`` / ``+rate`` / ``+closed`` (``distill.feedback_kind``) and ``+valid`` / ``+all``
(``distill.kd_depth_pixels``), e.g. ``adaptive+deficit``; mtl, self_train and static_kd take ``+noval`` (val frames
trained on, last weights kept: what holding out val costs). The seed changes which frames are labelled (with
``data`` None, each seed prepares its own data under ``out/runs/seed-S/prepared``), initialisation, data order and
augmentation; the test split is the same for every seed. Every run is a normal stage output
under ``out/runs/seed-S/``; a run already finished with the same params is reused, and an interrupted one resumes
from its checkpoint, so a killed ablation picks up where it stopped.

With ``vary`` (``ablate --vary distill.alpha=0,1,1.5,2``), the rows are instead the points of a grid over one or
more params keys, each paired by seed against the reference point (the values params gives those keys; added to
the grid when missing), with the same table, intervals and plots. A point that changes what the data or the
teachers depend on (e.g. ``prepare.val_fraction``) gets its own prepared data and teachers, next to the seed's.

The aggregation (`aggregate`) is one function of the runs' rows: the in-process driver here calls it, and so can any
other driver that gathers the same rows (one per seed and variant).

The gate: a benchmark whose teachers are not clearly better than plain multi-task training cannot show
distillation. For every seed, the teachers must beat ``mtl`` on test by at least 5 mIoU points and 5 % AbsErr.
Under a label budget (an unlabelled split that the KD modes learn from) the gate does not bound distillation: the
KD students also see frames that mtl cannot use, so the ablation says so instead of calling the benchmark unable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING

from jointdistill.config import Params, params_from_dict, parse_override
from jointdistill.data.contract import verify_prepared
from jointdistill.distill.knobs import refuse_unread
from jointdistill.distill.plan import MODES as DISTILL_MODES
from jointdistill.distill.plan import MTL, uses_teachers
from jointdistill.errors import ConfigError
from jointdistill.evaluation.gate import GATE_ABS_ERR, GATE_MIOU_POINTS, gate_failure
from jointdistill.io import atomic_write_text, write_json

if TYPE_CHECKING:
    from jointdistill.data.prepared import PreparedDataset

# torch, the stages and matplotlib are imported where they are used: tabulating rows (`aggregate`, the ablation
# pipeline's gathering steps) needs none of them.

log = logging.getLogger(__name__)
# The table's rows: the teachers themselves, then one student per distill mode.
TEACHERS_ROW = "single"
MODES = (TEACHERS_ROW, *DISTILL_MODES)
REFERENCE = "reference"  # a one-key-at-a-time grid's shared row: params' own values of every varied key
VARIANTS = {
    "cache": ("teacher_cache", True),
    "live": ("teacher_cache", False),
    "progress": ("feedback", "progress"),
    "deficit": ("feedback", "deficit"),
    "valid": ("kd_depth_pixels", "valid"),
    "all": ("kd_depth_pixels", "all"),
    "level": ("feedback_kind", "level"),
    "rate": ("feedback_kind", "rate"),
    "closed": ("feedback_kind", "closed"),
    "noval": ("hold_out_val", False),
}
NOVAL_MODES = ("mtl", "self_train", "static_kd")  # modes that read val only to pick their best weights
SEEDS = (0, 1, 2, 3, 4)
COLUMNS = ("miou", "pixacc", "abs_err", "rel_err", "delta_m")
LABELS = {"miou": "mIoU ↑", "pixacc": "pixAcc ↑", "abs_err": "AbsErr (m) ↓", "rel_err": "RelErr ↓", "delta_m": "Δm % ↑"}
# Stated before any run: the teachers' knowledge over plain labels and over the raw frames alone, then the paper's
# mechanisms one at a time, and the whole claim.
PAIRS = (
    ("static_kd", "mtl"),
    ("static_kd", "self_train"),
    ("adaptive", "static_kd"),
    ("full", "adaptive"),
    ("full", "mtl"),
    ("mtl+noval", "mtl"),
)
PAIR_METRICS = ("delta_m", "miou", "abs_err")
HIGHER_IS_BETTER = {"miou": True, "pixacc": True, "abs_err": False, "rel_err": False, "delta_m": True}


def parse_mode(mode: str) -> tuple[str, dict]:
    """``"full+deficit"`` → ("full", {"distill.feedback": "deficit"}); unknown names are a ConfigError."""
    base, *variants = mode.split("+")
    kd = base != TEACHERS_ROW and uses_teachers(base)
    allowed = [v for v in variants if v == "noval" and base in NOVAL_MODES or kd and v != "noval"]
    if base not in MODES or any(v not in VARIANTS for v in variants) or len(allowed) != len(variants):
        raise ConfigError(f"unknown mode {mode!r}")
    return base, {f"distill.{VARIANTS[v][0]}": VARIANTS[v][1] for v in variants}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a mode (``full+deficit``), the teachers themselves (``single``) or a grid point of
    ``--vary``. ``changes``: its params changes, as dotted keys."""

    name: str
    changes: dict = field(default_factory=dict)
    student: bool = True  # False: the teachers' own row, no student trained

    @property
    def folder(self) -> str:
        return self.name.replace("/", "_")


def mode_variants(modes) -> list[Variant]:
    """The rows of a mode ablation; unknown modes are one ConfigError naming them all."""
    unknown, out = [], []
    for m in modes:
        if m == TEACHERS_ROW:
            out.append(Variant(m, {}, student=False))
            continue
        try:
            name, changes = parse_mode(m)
        except ConfigError:
            unknown.append(m)
            continue
        out.append(Variant(m, {"distill.mode": name, **changes}))
    if unknown or not modes:
        raise ConfigError(
            f"--modes: unknown {unknown} (choose from {', '.join(MODES)}; a KD mode may add +{', +'.join(VARIANTS)})"
        )
    return out


def parse_vary(items: list[str]) -> dict[str, list]:
    """``["distill.alpha=0,1,1.5"]`` → {"distill.alpha": [0, 1, 1.5]}: each value read as YAML, as ``--set`` reads
    one."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not key.strip() or not values or not all(values):
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,..., e.g. distill.alpha=0,1,1.5,2")
        if key.strip() in grid:
            raise ConfigError(f"--vary: {key.strip()} is given twice")
        grid[key.strip()] = [parse_override(f"{key}={v}")[1] for v in values]
    return grid


def _value(params: Params, key: str):
    node = params.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--vary: unknown params key {key!r}")
        node = node[part]
    return node


def _point_name(point: dict) -> str:
    return ",".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in point.items())


def grid_variants(params: Params, grid: dict[str, list], each: bool = False) -> tuple[list[Variant], str]:
    """The points of ``grid`` and the reference point's name: the values ``params`` gives the grid's keys, put
    first when the grid lacks them. Each point must make valid params.

    ``each`` False: every combination of the values. True (a sensitivity sweep): each key varied alone, the
    others at params' values, every point paired against one shared row named REFERENCE."""
    reference = {k: _value(params, k) for k in grid}
    if each:
        points = [reference] + [{k: v} for k, values in grid.items() for v in values if v != reference[k]]
        names = [REFERENCE] + [_point_name(point) for point in points[1:]]
    else:
        points = [dict(zip(grid, values, strict=True)) for values in product(*grid.values())]
        if reference not in points:
            points.insert(0, reference)
        names = [_point_name(point) for point in points]
    # A value the params cannot take, or a key no point's mode reads, is an error now, not after hours of training.
    refuse_unread([with_changes(params, **point) for point in points], grid, "--vary")
    return [Variant(n, point) for n, point in zip(names, points, strict=True)], names[points.index(reference)]


def own_data_or_teachers(params: Params, variants: list[Variant]) -> list[str]:
    """The variants whose changes reach what the prepared data or the teachers depend on (they need their own)."""
    return [v.name for v in variants if teacher_key(with_changes(params, **v.changes)) != teacher_key(params)]


def _done(folder: Path, digest: str, key: str | None = None) -> bool:
    """A finished run with these params (and, where it left a key file, the same data and teachers)."""
    try:
        if json.loads((folder / "report.json").read_text()).get("params_digest") != digest:
            return False
    except (OSError, ValueError):
        return False
    key_file = folder.parent / f"{folder.name}.key"
    return key is None or not key_file.exists() or key_file.read_text().strip() == key


def teacher_key(params: Params) -> str:
    """What a teacher depends on (seed, data, augmentation, the teacher section): a change elsewhere, e.g. to
    distill, reuses the seed's teachers instead of training them again."""
    keep = {k: v for k, v in params.model_dump(mode="json").items() if k in ("seed", "prepare", "augment", "teacher")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _student_key(params: Params) -> str:
    """What a student run depends on beyond its distill params: the data and the teachers it learnt from."""
    text = f"{params.digest('distill')}:{params.digest('prepare')}:{teacher_key(params)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _teacher_done(folder: Path, params: Params) -> bool:
    # The key covers the data (prepare) as well as the teacher section; the report's digest alone does not.
    try:
        return (folder.parent / f"{folder.name}.key").read_text().strip() == teacher_key(params) and (
            folder / "model.pt"
        ).exists()
    except OSError:
        return False


def with_changes(params: Params, **changes) -> Params:
    """``params`` with dotted keys set (``seed=1``, ``**{"distill.mode": "full"}``), validated again."""
    data = params.model_dump(mode="json")
    for key, value in changes.items():
        *path, name = key.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown params key {key!r}")
            node = node[part]
        node[name] = value
    return params_from_dict(data, source="ablate")


def run(
    params: Params,
    data: str | Path | None,
    out: str | Path,
    modes=MODES,
    seeds=SEEDS,
    jobs: int = 1,
    vary: dict[str, list] | None = None,
    train: bool = True,
    each: bool = False,
) -> list[dict]:
    """Run the ablation into ``out``; return the table rows (also written as ablation.{md,csv,json,png}).

    ``train`` False tabulates only the runs already finished (a running or interrupted ablation), training
    nothing; each missing run is logged and left out, and the table gives each row's seed count.

    ``data``: one prepared folder for every seed, or None: each seed prepares its own (`seed_data`), so the seed
    draws which frames of the budget are labelled.

    ``vary``: a grid (`parse_vary`) whose points replace ``modes`` as the rows, each paired against the reference
    point (`grid_variants`; ``each``: one key at a time); the student's mode is ``params``' distill.mode.

    ``jobs`` > 1 trains that many seeds at once, each in its own process with an equal share of the CPU threads.
    The rows do not depend on it beyond what the thread count does to float reductions (see `run_seed`)."""
    variants, reference = plan(params, modes, vary, each)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    out = Path(out)
    data = Path(data) if data is not None else None
    jobs = min(jobs, len(seeds)) if train else 1
    if jobs == 1:
        per_seed = [run_seed(params, data, out, variants, seed, train) for seed in seeds]
    else:
        per_seed = _in_parallel(params, data, out, variants, seeds, jobs)
    results = [row for rows in per_seed for row in rows]
    first = data or (seed_data(params, seeds[0], out) if train else out / "runs" / f"seed-{seeds[0]}" / "prepared")
    kd_pool = pool_size(first) if params.distill.unlabelled_batch and first.is_dir() else 0
    names = [v.name for v in variants if any(r["mode"] == v.name for r in results)]
    if not names:
        raise ConfigError(f"{out}: no finished run to tabulate")
    return aggregate(out, results, names, seeds, kd_pool, reference)


def plan(
    params: Params, modes=MODES, vary: dict[str, list] | None = None, each: bool = False
) -> tuple[list[Variant], str | None]:
    """The rows of an ablation, from ``modes`` or from a grid (``vary``, one key at a time with ``each``), and the
    grid's reference point's name (None for modes). Every driver starts here."""
    if vary:
        return grid_variants(params, vary, each)
    return mode_variants(modes), None


def comparisons(names: list[str], reference: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
    """The pairs compared and the table's title: the stated PAIRS among mode rows, or each grid point against the
    reference point."""
    if reference is None:
        return stated_pairs(names), None
    return [(n, reference) for n in names if n != reference], f"--vary, paired against {reference} (params' values)"


def aggregate(
    out: Path,
    results: list[dict],
    names: list[str],
    seeds,
    kd_pool: int = 0,
    reference: str | None = None,
) -> list[dict]:
    """Everything an ablation writes, from its rows alone (one per seed and variant: seed, mode, the COLUMNS,
    val_mt_score): the table, the paired differences (`comparisons`), the gate, and their files. Returns the
    table. ``names``: the rows in table order; ``reference``: a grid's reference point (None for modes)."""
    pairs, title = comparisons(names, reference)
    table = summarise(results, names)
    compared = paired_rows(results, pairs)
    checks = gate(results, kd_pool)
    write_outputs(out, results, table, seeds, compared, checks, title)
    return table


def pool_size(data: str | Path) -> int:
    """Frames missing a task's label in ``data``'s train split and its unlabelled split."""
    meta = verify_prepared(Path(data), check_files=False)
    train = meta.get("labelled", {}).get("train")
    partial = int(meta["counts"]["train"]) - int(train["all"]) if train else 0
    return partial + int(meta["counts"].get("unlabelled", 0))


def seed_data(params: Params, seed: int, out: Path, name: str = "prepared") -> Path:
    """The seed's prepared data, ``out/runs/seed-S/<name>``: prepared with that seed (which draws val and the
    budget's labelled frames), or reused when a folder prepared with the same params is there."""
    from jointdistill.stages import prepare

    base = with_changes(params, seed=seed)
    folder = out / "runs" / f"seed-{seed}" / name
    try:
        if verify_prepared(folder)["params_digest"] == base.digest("prepare"):
            return folder
    except Exception:  # missing, partial or stale: prepare it (atomically) again
        pass
    log.info("ablate: seed %d, prepare %s", seed, name)
    prepare.run(base, folder)
    return folder


def _teachers(base: Params, data: Path, root: Path, suffix: str) -> dict:
    """Train (or reuse) the seed's two teachers into ``root/teachers<suffix>``; return their test metrics, Δm's
    reference."""
    from jointdistill.stages import teacher

    for task in ("seg", "depth"):
        folder = root / f"teachers{suffix}" / task
        if not _teacher_done(folder, base):
            log.info("ablate: seed %d, %s teacher%s", base.seed, task, suffix)
            teacher.run(base, task, data, folder, root / "checkpoints" / f"teacher{suffix}-{task}", resume=True)
            atomic_write_text(folder.parent / f"{task}.key", teacher_key(base) + "\n")
    return reference_metrics(root / f"teachers{suffix}" / "seg", root / f"teachers{suffix}" / "depth")


def reference_metrics(seg: Path, depth: Path) -> dict:
    """Δm's reference: the seg teacher's and the depth teacher's test metrics, from their reports."""
    tm = {t: json.loads((Path(f) / "report.json").read_text())["test"] for t, f in (("seg", seg), ("depth", depth))}
    return {
        "miou": tm["seg"]["miou"],
        "pixacc": tm["seg"]["pixacc"],
        "abs_err": tm["depth"]["abs_err"],
        "rel_err": tm["depth"]["rel_err"],
    }


def variant_params(params: Params, seed: int, variant: Variant) -> Params:
    """The params of one run: the seed, then the variant's changes."""
    return with_changes(with_changes(params, seed=seed), **variant.changes)


def teachers_row(seed: int, name: str, reference: dict) -> dict:
    """The table's row of the teachers themselves (Δm 0 by definition)."""
    return {"seed": seed, "mode": name, **reference, "delta_m": 0.0}


def score_student(params: Params, seed: int, name: str, data: Path, student: Path, reference: dict, test=None) -> dict:
    """One student's row: its test metrics, Δm against the seed's teachers (``reference``) and the val score of
    the weights it kept. ``test``: (meta, test split) when the caller already verified ``data``."""
    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.evaluation.scoring import delta_m, score_model
    from jointdistill.models import load_model
    from jointdistill.training.devices import resolve_device

    meta, test = test or (verify_prepared(data), PreparedDataset(data, "test"))
    model, _ = load_model(Path(student) / "student.pt")
    n_cls, ignore = len(meta["classes"]), meta["ignore_index"]
    device = resolve_device(params.evaluate.device)
    m = score_model(model, ("seg", "depth"), test, n_cls, ignore, params.evaluate.batch_size, device).metrics
    val = json.loads((Path(student) / "report.json").read_text())["val"]  # the best (or last) weights' val metrics
    return {
        "seed": seed,
        "mode": name,
        **{k: m[k] for k in COLUMNS[:4]},
        "delta_m": delta_m(m, reference),
        "val_mt_score": val.get("mt_score"),
    }


def run_seed(
    params: Params, data: Path | None, out: Path, variants: list[Variant], seed: int, train: bool = True
) -> list[dict]:
    """One seed of the ablation: its two teachers (once), then one student per variant, each evaluated on test.
    Returns that seed's rows. Every run is a resumable stage output under ``out/runs/seed-S/``; a variant that
    changes the data or the teachers gets its own (``prepared-<key>``, ``teachers-<key>``).

    Results are deterministic for a given machine and thread count: torch's CPU kernels split their reductions
    by thread, so a run at one thread and a run at two differ in the last bits, and from there in training."""
    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.stages import distill

    base = with_changes(params, seed=seed)
    root = out / "runs" / f"seed-{seed}"
    tests: dict[Path, tuple[dict, PreparedDataset]] = {}  # verified once per data folder
    rows = []
    for v in variants:
        p = variant_params(params, seed, v)
        same_data = p.digest("prepare") == base.digest("prepare")
        name = "prepared" if same_data else f"prepared-{p.digest('prepare')[:8]}"
        suffix = "" if teacher_key(p) == teacher_key(base) else f"-{teacher_key(p)[:8]}"
        if not train and not _finished(p, data, root, name, suffix, v):
            log.info("ablate: seed %d, %s: not finished, left out", seed, v.name)
            continue
        d = data if data is not None else seed_data(p, seed, out, name)
        reference = _teachers(p, d, root, suffix)
        if not v.student:
            rows.append(teachers_row(seed, v.name, reference))
            continue
        folder = root / v.folder
        if not _done(folder, p.digest("distill"), _student_key(p)):
            log.info("ablate: seed %d, %s", seed, v.name)
            name = p.distill.mode
            teachers = (
                (root / f"teachers{suffix}" / "seg", root / f"teachers{suffix}" / "depth")
                if uses_teachers(name)
                else None
            )
            distill.run(
                p,
                d,
                teachers,
                folder,
                root / "checkpoints" / v.folder,
                resume=True,
                teacher_cache=root / f"teacher_cache{suffix}",
            )
            atomic_write_text(folder.parent / f"{folder.name}.key", _student_key(p) + "\n")
        if d not in tests:
            tests[d] = verify_prepared(d), PreparedDataset(d, "test")
        rows.append(score_student(params, seed, v.name, d, folder, reference, tests[d]))
    return rows


def _finished(p: Params, data: Path | None, root: Path, name: str, suffix: str, v: Variant) -> bool:
    """Whether variant ``v``'s data, teachers and (for a student) run are all there, finished with these params."""
    if data is None:
        try:
            if verify_prepared(root / name, check_files=False)["params_digest"] != p.digest("prepare"):
                return False
        except Exception:
            return False
    if not all(_teacher_done(root / f"teachers{suffix}" / task, p) for task in ("seg", "depth")):
        return False
    return not v.student or _done(root / v.folder, p.digest("distill"), _student_key(p))


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _seed_worker(params: dict, data: str | None, out: str, variants: list[Variant], seed: int) -> list[dict]:
    return run_seed(params_from_dict(params), Path(data) if data else None, Path(out), variants, seed)


def _in_parallel(params: Params, data: Path | None, out: Path, variants, seeds, jobs: int) -> list[list[dict]]:
    """Seeds in ``jobs`` spawned processes (not forked: torch's thread pools do not survive a fork), each with
    1/jobs of the threads; the rows come back in seed order. On a 2-core CPU, two seeds at one thread each train
    faster than one seed at two threads after another: the small networks' kernels do not scale to both cores
    (the measurement: docs/method.md, Evidence)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from jointdistill.provenance.records import usable_cores

    threads = max(1, usable_cores() // jobs)
    log.info("ablate: %d seeds in %d processes, %d thread(s) each", len(seeds), jobs, threads)
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads, level)
    ) as pool:
        futures = [
            pool.submit(
                _seed_worker,
                params.model_dump(mode="json"),
                str(data) if data else None,
                str(out),
                list(variants),
                seed,
            )
            for seed in seeds
        ]
        return [f.result() for f in futures]


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of a two-sided Student-t interval of the mean. One value has no interval (low and high
    None): a single seed can never resolve a difference."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def stated_pairs(modes) -> list[tuple[str, str]]:
    """The PAIRS present among ``modes`` (variants too: ``full+deficit`` pairs with ``adaptive+deficit`` and with
    ``mtl``)."""
    out = []
    for a_base, b_base in PAIRS:
        for a in [m for m in modes if (m == a_base if "+" in a_base else m.split("+")[0] == a_base)]:
            suffix = a[len(a_base) :] if "+" not in a_base else ""
            b = b_base + suffix if b_base + suffix in modes else b_base
            if b in modes:
                out.append((a, b))
    return out


def paired_rows(results: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """For each pair (a, b): per metric the mean of a − b over the seeds both ran, its 95 % t-interval, and how
    many seeds favour a (higher mIoU and Δm, lower AbsErr)."""
    by = {(r["mode"], r["seed"]): r for r in results}
    out = []
    for a, b in pairs:
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        if not seeds:
            continue
        row = {"a": a, "b": b, "seeds": len(seeds)}
        for key in PAIR_METRICS:
            diffs = [by[(a, s)][key] - by[(b, s)][key] for s in seeds]
            mean, low, high = t_interval(diffs)
            better = sum((d > 0) if HIGHER_IS_BETTER[key] else (d < 0) for d in diffs)
            row[key] = {"mean": mean, "low": low, "high": high, "better": better}
        out.append(row)
    return out


def paired(results: list[dict], modes) -> list[dict]:
    """`paired_rows` over the stated PAIRS present among ``modes``."""
    return paired_rows(results, stated_pairs(modes))


def gate(results: list[dict], unlabelled: int = 0) -> dict:
    """Per seed: do the teachers beat mtl by ≥ 5 mIoU points and ≥ 5 % AbsErr on test? ``unlabelled``: frames
    without labels that the KD modes learn from (then the gate does not bound what distillation can add)."""
    by = {(r["mode"], r["seed"]): r for r in results}
    seeds = sorted(s for (m, s) in by if m == MTL and (TEACHERS_ROW, s) in by)
    rows = []
    for s in seeds:
        t, m = by[(TEACHERS_ROW, s)], by[(MTL, s)]
        miou_gap = t["miou"] - m["miou"]
        abs_gap = (m["abs_err"] - t["abs_err"]) / m["abs_err"]
        rows.append(
            {
                "seed": s,
                "miou_points": 100 * miou_gap,
                "abs_err_percent": 100 * abs_gap,
                "passed": miou_gap >= GATE_MIOU_POINTS and abs_gap >= GATE_ABS_ERR,
            }
        )
    return {
        "seeds": rows,
        "passed": bool(rows) and all(r["passed"] for r in rows),
        "rule": f"teachers beat mtl on test by >= {100 * GATE_MIOU_POINTS:g} mIoU points and "
        f">= {100 * GATE_ABS_ERR:g} % AbsErr, for every seed",
        "unlabelled": unlabelled,
    }


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


def markdown(
    table: list[dict],
    seeds,
    pairs: list[dict] | None = None,
    checks: dict | None = None,
    title: str | None = None,
) -> str:
    lines = [
        f"Ablation{' (' + title + ')' if title else ''} on test, mean ± std over seeds {', '.join(map(str, seeds))} "
        "(Δm against each seed's single-task teachers).",
        "",
        "| mode | " + " | ".join(LABELS[k] for k in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in table:
        cells = []
        for key in COLUMNS:
            digits = 2 if key in ("abs_err", "delta_m") else 4
            cells.append(f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}")
        partial = f" ({row['seeds']} seeds)" if row["seeds"] != len(seeds) else ""
        lines.append(f"| {row['mode']}{partial} | " + " | ".join(cells) + " |")
    if pairs:
        lines += [
            "",
            "Paired by seed: mean difference [95 % t-interval] (seeds where the first is better / seeds). "
            "mIoU in points, AbsErr in m.",
            "",
            "| pair | Δm % | mIoU (points) | AbsErr (m) | resolved |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            cells = []
            for key in PAIR_METRICS:
                f = 100.0 if key == "miou" else 1.0
                d = p[key]
                interval = "no interval" if d["low"] is None else f"{f * d['low']:+.2f}, {f * d['high']:+.2f}"
                cells.append(f"{f * d['mean']:+.2f} [{interval}] ({d['better']}/{p['seeds']})")
            dm = p["delta_m"]
            verdict = (
                "no: one seed"
                if dm["low"] is None
                else "yes: better"
                if dm["low"] > 0
                else "yes: worse"
                if dm["high"] < 0
                else "no"
            )
            lines.append(f"| {p['a']} − {p['b']} | " + " | ".join(cells) + f" | {verdict} |")
    if checks and checks["seeds"]:
        lines += [
            "",
            f"Gate ({checks['rule']}): **{'passed' if checks['passed'] else 'FAILED'}**"
            + ("" if checks["passed"] else gate_failure(checks.get("unlabelled", 0)))
            + ".",
            "",
        ]
        lines += [
            f"- seed {r['seed']}: {r['miou_points']:+.1f} mIoU points, {r['abs_err_percent']:+.1f} % AbsErr"
            f" ({'ok' if r['passed'] else 'below'})"
            for r in checks["seeds"]
        ]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(
    out: Path,
    results: list[dict],
    table: list[dict],
    seeds,
    pairs: list[dict] | None = None,
    checks: dict | None = None,
    title: str | None = None,
) -> None:
    from jointdistill.evaluation import plots

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.md", markdown(table, seeds, pairs, checks, title))
    atomic_write_text(out / "ablation.csv", _csv(table, list(table[0])))
    atomic_write_text(out / "runs.csv", _csv(results, ["seed", "mode", *COLUMNS, "val_mt_score"]))
    write_json(
        out / "ablation.json",
        {
            "seeds": list(seeds),
            "title": title,
            "table": table,
            "pairs": pairs or [],
            "gate": checks or {},
            "runs": results,
        },
    )
    plots.ablation_bars(table, list(COLUMNS), out / "ablation.png")
    if pairs:
        plots.paired_differences(pairs, list(PAIR_METRICS), out / "paired.png")
        for key, group in _by_key(pairs).items():
            plots.paired_differences(group, list(PAIR_METRICS), out / f"paired-{key}.png")


def _by_key(pairs: list[dict]) -> dict[str, list[dict]]:
    """A one-key-at-a-time grid's pairs by the key their point varies (``distill.alpha=0`` − reference), where it
    varies more than one key: a plot per question. Empty for modes and for a grid of combinations."""
    groups: dict[str, list[dict]] = {}
    for p in pairs:
        if p["b"] != REFERENCE:
            return {}
        groups.setdefault(p["a"].split("=", 1)[0], []).append(p)
    return groups if len(groups) > 1 else {}
