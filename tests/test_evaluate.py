"""The evaluate stage (metrics, Δm, plots, report) and the ablation, on tiny runs."""

import csv
import json
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jointdistill import ablation as ablate
from jointdistill.config import load_params
from jointdistill.errors import ModelError
from jointdistill.evaluation.scoring import DepthBins, delta_m, depth_edges
from jointdistill.provenance import records
from jointdistill.stages import distill, evaluate

from .conftest import REPO, TINY

FAST = [
    *TINY,
    "distill.batch_size=4",
    "distill.epochs=2",
    "distill.probe_images=4",
    "distill.top_k=5",
    "teacher.batch_size=4",
    "teacher.epochs=1",
    "evaluate.qualitative_images=3",
    "evaluate.depth_bins=4",
]


def params(*extra):
    return load_params(REPO / "params.yaml", [*FAST, *extra])


# ----------------------------------------------------------------------------- Δm and depth bins by hand
def test_delta_m_by_hand_signs_per_metric():
    ref = {"miou": 0.5, "pixacc": 0.8, "abs_err": 2.0, "rel_err": 0.2}
    assert delta_m(ref, ref) == 0.0
    # +10 % mIoU (better), −10 % pixAcc (worse), AbsErr 1.8 = 10 % lower (better), RelErr 0.25 = 25 % higher (worse)
    m = {"miou": 0.55, "pixacc": 0.72, "abs_err": 1.8, "rel_err": 0.25}
    assert delta_m(m, ref) == pytest.approx((10 - 10 + 10 - 25) / 4)
    assert delta_m({**ref, "abs_err": 1.0}, ref) == pytest.approx(50 / 4)  # halving the error is +50 % on it
    assert delta_m({**ref, "miou": 1.0}, ref) == pytest.approx(100 / 4)
    with pytest.raises(KeyError, match="missing"):
        delta_m({"miou": 1}, ref)
    with pytest.raises(ValueError, match="reference's miou is 0"):
        delta_m(m, {**ref, "miou": 0.0})


def test_depth_bins_by_hand():
    import torch

    bins = DepthBins(np.array([1.0, 10.0, 100.0]))
    gt = torch.tensor([2.0, 5.0, 20.0, 0.0])
    pred = torch.tensor([3.0, 5.0, 10.0, 7.0])
    bins.update(pred, gt)
    rows = bins.rows()
    assert [r["pixels"] for r in rows] == [2, 1]
    assert rows[0]["abs_err"] == pytest.approx(0.5) and rows[0]["rel_err"] == pytest.approx(0.25)
    assert rows[1]["abs_err"] == pytest.approx(10.0) and rows[1]["rel_err"] == pytest.approx(0.5)
    edges = depth_edges(2.0, 100.0, 4)
    assert len(edges) == 5 and edges[0] == pytest.approx(2.0) and edges[-1] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="session")  # shared by both lanes (see conftest)
def evaluated(prepared, tiny_teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    distill.run(params(), prepared, tiny_teachers, root / "student")
    distill.run(params("distill.mode=mtl"), prepared, None, root / "mtl")
    metrics = evaluate.run(params(), prepared, tiny_teachers, root / "student", root / "eval", mtl=root / "mtl")
    return root, metrics


def test_metrics_file_and_delta_m(evaluated):
    root, metrics = evaluated
    on_disk = json.loads((root / "eval" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(records.split(metrics)[0]))
    curated = json.loads((root / "eval" / "metrics.json").read_text())  # numbers only, for DVC and Kubeflow
    assert set(curated) == {
        "miou",
        "pixacc",
        "abs_err",
        "rel_err",
        "delta1",
        "delta_m",
        "delta_m_vs_mtl",
        "flops_ratio",
    }
    assert curated["delta_m"] == pytest.approx(metrics["student"]["test"]["delta_m"], abs=1e-6)
    assert " ms" not in (root / "eval" / "report.md").read_text()  # timings stay out of the stage's output
    s, seg, dep = metrics["student"]["test"], metrics["teacher_seg"]["test"], metrics["teacher_depth"]["test"]
    for key in ("miou", "pixacc", "abs_err", "rel_err", "delta1", "delta_m", "delta_m_vs_mtl"):
        assert key in s, key
    assert set(s["per_class_iou"]) == {"flat", "construction", "object", "nature", "sky", "human", "vehicle"}
    ref = {"miou": seg["miou"], "pixacc": seg["pixacc"], "abs_err": dep["abs_err"], "rel_err": dep["rel_err"]}
    rel = {k: (s[k] - ref[k]) / ref[k] for k in ref}
    by_hand = 25 * (rel["miou"] + rel["pixacc"] - rel["abs_err"] - rel["rel_err"])
    assert s["delta_m"] == pytest.approx(by_hand)
    m = metrics["mtl"]["test"]
    assert s["delta_m_vs_mtl"] == pytest.approx(delta_m(s, m))
    # The student's test metrics equal those the distill stage measured on the same split.
    d = json.loads((root / "student" / "report.json").read_text())["test"]
    assert s["miou"] == pytest.approx(d["miou"]) and s["abs_err"] == pytest.approx(d["abs_err"])
    # The capacity gate against the MTL baseline, by hand.
    gate = metrics["gate"]
    assert gate["miou_points"] == pytest.approx(100 * (seg["miou"] - m["miou"]))
    assert gate["abs_err_percent"] == pytest.approx(100 * (m["abs_err"] - dep["abs_err"]) / m["abs_err"])
    assert gate["passed"] == (gate["miou_points"] >= 5 and gate["abs_err_percent"] >= 5)
    # Inference cost: FLOPs per image at the training size and latency, and the student's share of the teachers'.
    cost = metrics["cost"]
    assert set(cost["flops"]) == set(cost["latency_ms"]) == {"student", "teacher_seg", "teacher_depth"}
    assert cost["student_flops_vs_teachers"] == pytest.approx(
        cost["flops"]["student"] / (cost["flops"]["teacher_seg"] + cost["flops"]["teacher_depth"])
    )
    assert all(v > 0 for v in cost["latency_ms"].values())


def _png_ok(path, min_size=(100, 60)):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
    assert a.std() > 5, f"{path} is (nearly) blank"


def test_pictures_are_real_pngs(evaluated):
    root, _ = evaluated
    plots = root / "eval" / "plots"
    for name in ("qualitative", "confusion", "weights", "trajectory", "per_class_iou", "depth_error"):
        _png_ok(plots / f"{name}.png")
    with Image.open(plots / "qualitative.png") as im:
        assert im.size[0] > 3 * im.size[1] / 3  # six panels side by side, three rows


def test_plot_data_files(evaluated):
    root, metrics = evaluated
    plots = root / "eval" / "plots"
    # One file per model, so that DVC draws the models side by side (one colour each), not stacked.
    assert {f.stem for f in (plots / "per_class_iou").iterdir()} == {"student", "teacher_seg", "mtl"}
    with open(plots / "per_class_iou" / "student.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    flat = rows[0]
    assert float(flat["iou"]) == pytest.approx(metrics["student"]["test"]["per_class_iou"]["flat"])
    with open(plots / "weights.csv") as f:
        w = list(csv.DictReader(f))
    assert [int(r["timeframe"]) for r in w] == [0, 1, 2]
    assert all(float(r["omega_seg"]) + float(r["omega_depth"]) == pytest.approx(2.0) for r in w)
    with open(plots / "trajectory_loss.csv") as f:
        t = list(csv.DictReader(f))
    assert [r["timeframe"] for r in t] == ["1", "2"] and float(t[1]["train_traj_loss"]) > 0
    assert {f.stem for f in (plots / "depth_error").iterdir()} == {"student", "teacher_depth", "mtl"}
    for model in ("student", "teacher_depth", "mtl"):  # one line per model: distances rise within each file
        with open(plots / "depth_error" / f"{model}.csv") as f:
            d = list(csv.DictReader(f))
        assert all(float(r["abs_err"]) >= 0 and int(r["pixels"]) > 0 for r in d)
        assert [float(r["distance_m"]) for r in d] == sorted(float(r["distance_m"]) for r in d)


def test_report_renders(evaluated):
    root, metrics = evaluated
    md = (root / "eval" / "report.md").read_text()
    s = metrics["student"]["test"]
    assert f"{s['delta_m']:+.2f} %" in md and "| student (full) |" in md and "MTL baseline" in md
    for name in ("qualitative", "confusion", "weights", "trajectory"):
        assert f"(plots/{name}.png)" in md and (root / "eval" / "plots" / f"{name}.png").exists()
    assert "```yaml" in md and "mode: full" in md  # the exact params
    gate = metrics["gate"]
    assert ("Gate passed" if gate["passed"] else "Gate failed") in md and "GFLOP per image" in md
    html = (root / "eval" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") >= 6
    assert 'src="plots/' not in html and f"{s['delta_m']:+.2f} %" in html  # self-contained


def test_single_task_model_as_student_is_refused(prepared, tiny_teachers, tmp_path):
    with pytest.raises(ModelError, match="not a multi-task student"):
        evaluate.run(params(), prepared, tiny_teachers, tiny_teachers[0] / "model.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dvc_metrics_show_reads_it(evaluated, tmp_path):
    root, metrics = evaluated
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text((root / "eval" / "metrics.json").read_text())  # numbers only
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - eval/metrics.json\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    r = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    (workspace,) = json.loads(r.stdout).values()  # one revision: the workspace (no commit yet)
    shown = workspace["data"]["eval/metrics.json"]["data"]
    assert shown["delta_m"] == pytest.approx(metrics["student"]["test"]["delta_m"], abs=1e-6)


# ----------------------------------------------------------------------------- ablation
def test_ablation_table_is_mean_and_std_of_the_runs(prepared, tmp_path):
    p = params("distill.epochs=1")
    modes = ["single", "mtl", "full", "full+cache"]
    # Both seeds at once, in two spawned processes (--jobs 2); the re-run at the end reads them back in-process.
    table = ablate.run(p, prepared, tmp_path / "abl", modes=modes, seeds=[0, 1], jobs=2)
    assert [r["mode"] for r in table] == modes and all(r["seeds"] == 2 for r in table)
    with open(tmp_path / "abl" / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    for seed in (0, 1):  # full+cache trained from one cache per seed, full ran its teachers every step
        cached = json.loads((tmp_path / "abl" / "runs" / f"seed-{seed}" / "full+cache" / "run.json").read_text())
        live = json.loads((tmp_path / "abl" / "runs" / f"seed-{seed}" / "full" / "report.json").read_text())
        assert cached["teacher_cache"]["path"] == str(tmp_path / "abl" / "runs" / f"seed-{seed}" / "teacher_cache")
        assert live["teacher_cache"] is None and cached["teacher_cache"]["reused"] is False
        assert cached["teacher_forward_images"] == cached["teacher_cache"]["teacher_forward_images"]  # the build
    for row in table:
        for key in ("miou", "abs_err", "delta_m"):
            vals = [float(r[key]) for r in runs if r["mode"] == row["mode"]]
            assert row[f"{key}_mean"] == pytest.approx(statistics.fmean(vals))
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(vals))
    single = table[0]
    assert single["delta_m_mean"] == 0.0 and single["delta_m_std"] == 0.0
    # The two seeds really differ (initialisation and order), so std > 0 for trained rows.
    assert table[1]["miou_std"] > 0
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| mode | mIoU ↑ | pixAcc ↑ | AbsErr (m) ↓ | RelErr ↓ | Δm % ↑ |" in md and "| full |" in md
    _png_ok(tmp_path / "abl" / "ablation.png")
    # Paired by seed (the teachers of a seed are shared by all its modes), with the gate, as JSON and a plot.
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [(p["a"], p["b"]) for p in saved["pairs"]] == [("full", "mtl"), ("full+cache", "mtl")]
    by = {(r["mode"], int(r["seed"])): float(r["delta_m"]) for r in runs}
    diffs = [by[("full", s)] - by[("mtl", s)] for s in (0, 1)]
    assert saved["pairs"][0]["delta_m"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert [g["seed"] for g in saved["gate"]["seeds"]] == [0, 1] and "Gate (" in md and "| full − mtl |" in md
    _png_ok(tmp_path / "abl" / "paired.png", min_size=(100, 40))
    # Re-running reuses every finished run (same params) instead of training again.
    stamp = (tmp_path / "abl" / "runs" / "seed-1" / "full" / "student.pt").stat().st_mtime_ns
    again = ablate.run(p, prepared, tmp_path / "abl", modes=modes, seeds=[0, 1], jobs=2)
    assert again == table
    # In this process (all threads) the test metrics of the same students agree up to float reductions by thread.
    serial = ablate.run(p, prepared, tmp_path / "abl", modes=modes, seeds=[0, 1])
    assert [r["mode"] for r in serial] == modes
    for a, b in zip(serial, table, strict=True):
        assert a.pop("mode") == b["mode"]
        assert a == pytest.approx({k: v for k, v in b.items() if k != "mode"}, rel=1e-2, abs=1e-3)
    assert (tmp_path / "abl" / "runs" / "seed-1" / "full" / "student.pt").stat().st_mtime_ns == stamp


def test_ablate_cli_rejects_unknown_mode(tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    args = ["ablate", "--params", str(REPO / "params.yaml"), "--modes", "mtl,eata,mtl+cache", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "unknown ['eata', 'mtl+cache']" in r.stderr


def test_ablate_cli_takes_a_grid_or_modes_not_both(tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    base = ["ablate", "--params", str(REPO / "params.yaml"), "--out", str(tmp_path)]
    r = CliRunner().invoke(app, [*base, "--vary", "distill.alpha=0,1", "--modes", "mtl"])
    assert r.exit_code == 2 and "--vary and --modes" in r.stderr
    r = CliRunner().invoke(app, [*base, "--vary", "distill.alfa=0,1"])
    assert r.exit_code == 2 and "unknown params key 'distill.alfa'" in r.stderr
    r = CliRunner().invoke(app, [*base, "--one-at-a-time"])
    assert r.exit_code == 2 and "--one-at-a-time varies the keys of --vary" in r.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_ablate_vary_pairs_every_point_with_the_reference(prepared, tmp_path):
    p = params("distill.epochs=1", "distill.mode=mtl")
    out = tmp_path / "grid"
    table = ablate.run(p, prepared, out, seeds=[0, 1], vary={"distill.lambda_depth": [0.5]})
    names = ["distill.lambda_depth=2.0", "distill.lambda_depth=0.5"]  # the params' value first: the reference
    assert [r["mode"] for r in table] == names and all(r["seeds"] == 2 for r in table)
    saved = json.loads((out / "ablation.json").read_text())
    assert [(q["a"], q["b"]) for q in saved["pairs"]] == [(names[1], names[0])]
    by = {(r["mode"], r["seed"]): r["delta_m"] for r in saved["runs"]}
    diffs = [by[(names[1], s)] - by[(names[0], s)] for s in (0, 1)]
    assert saved["pairs"][0]["delta_m"]["mean"] == pytest.approx(statistics.fmean(diffs)) and diffs[0] != 0
    md = (out / "ablation.md").read_text()
    assert (
        "paired against distill.lambda_depth=2.0 (params' values)" in md
        and "| distill.lambda_depth=0.5 − distill.lambda_depth=2.0 |" in md
    )
    for seed in (0, 1):  # one student per point, beside the seed's one pair of teachers
        runs = out / "runs" / f"seed-{seed}"
        assert sorted(f.name for f in runs.iterdir() if (f / "student.pt").exists()) == sorted(names)
        assert not [f for f in runs.iterdir() if f.name.startswith("teachers-")]
    stamp = (out / "runs" / "seed-1" / names[1] / "student.pt").stat().st_mtime_ns
    assert ablate.run(p, prepared, out, seeds=[0, 1], vary={"distill.lambda_depth": [0.5]}) == table  # reused
    assert (out / "runs" / "seed-1" / names[1] / "student.pt").stat().st_mtime_ns == stamp
    # --finished tabulates what has finished and trains nothing: a missing run is left out, its row says so.
    shutil.rmtree(out / "runs" / "seed-1" / names[1])
    partial = ablate.run(p, prepared, out, seeds=[0, 1], vary={"distill.lambda_depth": [0.5]}, train=False)
    assert [r["seeds"] for r in partial] == [2, 1] and not (out / "runs" / "seed-1" / names[1]).exists()
    assert f"| {names[1]} (1 seeds) |" in (out / "ablation.md").read_text()


def test_ablate_vary_gives_a_point_that_changes_the_data_its_own_data_and_teachers(tmp_path):
    """A grid over a prepare key: that point's seed prepares its own data and trains its own teachers; the reference
    point keeps the seed's. The students key on their data, so a different budget never reuses a stale one."""
    from jointdistill.data.contract import verify_prepared

    p = params("distill.epochs=1", "distill.mode=mtl")
    out = tmp_path / "grid"
    ablate.run(p, None, out, seeds=[0], vary={"prepare.val_fraction": [0.3]})
    runs = out / "runs" / "seed-0"
    other = _with_val(p, 0.3)
    assert verify_prepared(runs / "prepared")["params_digest"] == ablate.with_changes(p, seed=0).digest("prepare")
    own = runs / f"prepared-{other.digest('prepare')[:8]}"
    assert verify_prepared(own)["params_digest"] == other.digest("prepare")
    assert (runs / f"teachers-{ablate.teacher_key(other)[:8]}" / "seg" / "model.pt").exists()
    assert (runs / "teachers" / "seg" / "model.pt").exists()
    key = (runs / "prepare.val_fraction=0.3.key").read_text().strip()
    assert key == ablate._student_key(other) != (runs / "prepare.val_fraction=0.15.key").read_text().strip()


def _with_val(p, fraction):
    return ablate.with_changes(p, seed=0, **{"prepare.val_fraction": fraction})
