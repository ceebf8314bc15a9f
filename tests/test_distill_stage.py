"""The distill stage on tiny data: outputs of every mode, the adaptive weights and the knowledge trajectory
as logged, mtl without teachers, bad inputs caught before training, exact resume after SIGKILL, DDP."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from jointdistill.config import load_params
from jointdistill.distill import builder
from jointdistill.distill.builder import probe_indices
from jointdistill.distill.weights import update
from jointdistill.errors import ConfigError, DataError, ModelError
from jointdistill.models import load_model
from jointdistill.provenance import records
from jointdistill.stages import distill

from .conftest import REPO, TINY

K, PROBES, EPOCHS = 5, 4, 3
FAST = [
    *TINY,
    "distill.batch_size=4",
    f"distill.epochs={EPOCHS}",
    f"distill.probe_images={PROBES}",
    f"distill.top_k={K}",
    "distill.traj_batch=2",
    "distill.checkpoint_every=4",
    "distill.trajectory_length=2",
    # The level rule: with a few timeframes it moves ω from the first one (rate needs three steps of the gap to
    # know its noise; its behaviour is replayed in test_teacher_weights).
    "distill.feedback_kind=level",
]
ENV = {**os.environ, "JOINTDISTILL_PROGRESS": "off", "OMP_NUM_THREADS": "1"}


def params(*extra):
    return load_params(REPO / "params.yaml", [*FAST, *extra])


@pytest.fixture(scope="module")
def runs(prepared, tiny_teachers, tmp_path_factory):
    """One run per mode on the same data and teachers."""
    root = tmp_path_factory.mktemp("distill")
    reports = {}
    for mode in ("mtl", "static_kd", "full"):
        teachers = None if mode == "mtl" else tiny_teachers
        reports[mode] = distill.run(params(f"distill.mode={mode}"), prepared, teachers, root / mode)
    return root, reports


def read_weights(folder):
    with open(folder / "weights.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_of_a_full_run(runs):
    root, reports = runs
    out = root / "full"
    metrics = json.loads((out / "report.json").read_text())
    content, run_facts = records.split(reports["full"])
    assert metrics == json.loads(json.dumps(content))  # the report without the run's facts
    assert json.loads((out / "run.json").read_text())["train_seconds"] == run_facts["train_seconds"] > 0
    curated = json.loads((out / "metrics.json").read_text())  # numbers only, what DVC and Kubeflow show
    assert set(curated) == {"miou", "pixacc", "abs_err", "rel_err", "delta1", "seconds"}
    assert all(isinstance(v, (int, float)) for v in curated.values())
    assert metrics["mode"] == "full" and 1 <= metrics["best_epoch"] <= EPOCHS
    for split in ("val", "test"):
        assert {"miou", "pixacc", "abs_err", "rel_err", "delta1", "per_class_iou"} <= set(metrics[split])
    model, record = load_model(out / "student.pt")
    assert set(model(torch.zeros(1, 3, 48, 96))) == {"features", "seg", "depth"}
    assert record["mode"] == "full" and record["classes"][0] == "flat"
    assert set(metrics["teachers"]) == {"seg", "depth"} and metrics["teachers"]["seg"]["val"]["miou"] > 0
    live = out / "dvclive" / "plots" / "metrics"
    for name in ("omega/seg.tsv", "omega/depth.tsv", "traj/l1_values.tsv", "val/miou.tsv", "train/traj.tsv"):
        assert (live / name).exists(), name


def test_adaptive_weights_follow_the_update_rule_and_move(runs):
    root, reports = runs
    rows = read_weights(root / "full")
    assert [r["timeframe"] for r in rows] == ["0", "0", *[str(t) for t in range(1, EPOCHS + 1) for _ in (0, 1)]]
    cfg = params().distill
    w = {"seg": 1.0, "depth": 1.0}
    for t in range(1, EPOCHS + 1):
        frame = {r["task"]: r for r in rows if r["timeframe"] == str(t)}
        a = {task: float(frame[task]["feedback"]) for task in w}
        w = update(w, a, cfg.alpha, cfg.beta, cfg.weight_min, cfg.weight_max)
        assert {task: float(frame[task]["omega"]) for task in w} == pytest.approx(w)
        assert sum(w.values()) == pytest.approx(2.0)
    first = {r["task"]: r for r in rows if r["timeframe"] == "1"}
    a_seg, a_depth = float(first["seg"]["feedback"]), float(first["depth"]["feedback"])
    assert a_seg != pytest.approx(a_depth, rel=1e-3), "the tasks progressed identically: the test data is too easy"
    # From equal weights, the task with the higher feedback gets the higher weight (target ∝ a_i).
    assert (float(first["depth"]["omega"]) > float(first["seg"]["omega"])) == (a_depth > a_seg)
    omegas = {round(float(r["omega"]), 9) for r in rows if r["task"] == "seg"}
    assert len(omegas) > 2, "ω stayed constant in a full run"
    # The feedback is the student's val score over the teacher's: a_seg = mIoU_S / mIoU_T at timeframe 1.
    teacher_miou = reports["full"]["teachers"]["seg"]["val"]["miou"]
    assert 0 < a_seg < 10 and teacher_miou > 0


def test_static_kd_keeps_equal_weights_but_logs_feedback(runs):
    root, _ = runs
    rows = read_weights(root / "static_kd")
    assert len(rows) == 2 * (EPOCHS + 1)
    assert {float(r["omega"]) for r in rows} == {1.0}
    assert len({r["feedback"] for r in rows if r["timeframe"] != "0"}) > 1


def test_trajectory_file_and_distance(runs, prepared):
    root, reports = runs
    table = pq.read_table(root / "full" / "trajectory.parquet").to_pandas()
    assert list(table.columns) == ["timeframe", "step", "image", "rank", "y", "x", "value", "source"]
    assert len(table) == EPOCHS * PROBES * K * 2
    # Every train frame is labelled here, so the probes are train images (never val, which decides the feedback
    # and the best checkpoint), fixed by the seed.
    n_train = json.loads((prepared / "meta.json").read_text())["counts"]["train"]
    assert sorted(set(table["image"])) == probe_indices(range(n_train), PROBES, 0)
    for _, frame in table.groupby(["timeframe", "source"], observed=True):
        assert frame["image"].nunique() == PROBES and frame["image"].between(0, n_train - 1).all()
        for _, pts in frame.groupby("image"):
            assert sorted(pts["rank"]) == list(range(K))  # k points per probe image per timeframe
            v = pts.sort_values("rank")["value"].to_numpy()
            assert (v[:-1] >= v[1:]).all() and (v > 0).all()
            assert pts[["y", "x"]].drop_duplicates().shape[0] == K
    assert set(table["source"]) == {"connector", "student"}
    # The same probe images every timeframe, for both sources.
    assert table.groupby("timeframe")["image"].apply(lambda s: tuple(sorted(set(s)))).nunique() == 1
    traj = reports["full"]["trajectory"]
    assert [f["timeframe"] for f in traj["per_timeframe"]] == list(range(1, EPOCHS + 1))
    for f in traj["per_timeframe"]:
        assert f["l1_values"] > 0 and f["l1_at_points"] > 0 and 0 <= f["overlap"] <= 1
    # The L1 distance logged is the rank-wise distance between the two sources' values in the file.
    t1 = table[table.timeframe == 1].sort_values(["image", "rank"])
    con, stu = t1[t1.source == "connector"]["value"].to_numpy(), t1[t1.source == "student"]["value"].to_numpy()
    assert abs(con - stu).mean() == pytest.approx(traj["per_timeframe"][0]["l1_values"], rel=1e-5)
    assert traj["storage_ratio"] < 0.05 and traj["bytes"] == (root / "full" / "trajectory.parquet").stat().st_size


def test_trajectory_loss_only_in_full_mode(runs):
    root, reports = runs
    live = root / "full" / "dvclive" / "plots" / "metrics" / "train" / "traj.tsv"
    values = [float(line.split("\t")[-1]) for line in live.read_text().splitlines()[1:]]
    # Epoch 1 has an empty buffer (no loss); from epoch 2 on the student is pulled towards the trajectory.
    assert len(values) == EPOCHS - 1 and all(v > 0 for v in values)
    assert not (root / "static_kd" / "dvclive" / "plots" / "metrics" / "train" / "traj.tsv").exists()
    assert (root / "static_kd" / "dvclive" / "plots" / "metrics" / "train" / "kd_seg.tsv").exists()


def test_static_kd_from_the_teachers_trains_no_connector(runs):
    """kd_target: teachers (the default) leaves the connector out of static_kd: no warm-up, no scoring, no connector
    trajectory; the KD terms still act on the encoder. full keeps it (the trajectory reads its fused map)."""
    root, reports = runs
    kd, full = reports["static_kd"], reports["full"]
    assert kd["connector"] == {"warmup": None, "history": []} and full["connector"]["history"]
    assert {"kd_seg", "kd_depth"} <= set(kd["gradients"]["mean_norm"])
    sources = set(pq.read_table(root / "static_kd" / "trajectory.parquet").column("source").to_pylist())
    assert sources == {"student"}
    assert set(pq.read_table(root / "full" / "trajectory.parquet").column("source").to_pylist()) == {
        "student",
        "connector",
    }


def test_mtl_never_runs_the_teachers(runs, prepared, tiny_teachers, tmp_path, monkeypatch):
    root, reports = runs
    mtl = reports["mtl"]
    assert mtl["teachers"] is None and mtl["teacher_forward_images"] == 0
    assert reports["full"]["teacher_forward_images"] > 0
    assert read_weights(root / "mtl") == []
    table = pq.read_table(root / "mtl" / "trajectory.parquet").to_pandas()
    assert set(table["source"]) == {"student"} and len(table) == EPOCHS * PROBES * K
    assert not (root / "mtl" / "dvclive" / "plots" / "metrics" / "train" / "kd_seg.tsv").exists()

    def boom(*a, **k):
        raise AssertionError("mtl loaded a teacher")

    monkeypatch.setattr(builder, "load_teacher", boom)
    report = distill.run(params("distill.mode=mtl", "distill.epochs=1"), prepared, tiny_teachers, tmp_path / "o")
    assert report["teacher_forward_images"] == 0


def test_every_mode_learns(runs):
    _, reports = runs
    for mode, r in reports.items():
        assert r["test"]["miou"] > 0.15 and r["test"]["abs_err"] < 15, mode


@pytest.mark.parametrize(
    "case", ["swapped", "student_as_teacher", "architecture", "classes", "missing", "none", "probes", "top_k"]
)
def test_bad_inputs_fail_before_training(case, prepared, tiny_teachers, tmp_path):
    seg, depth = tiny_teachers
    teachers, extra = (seg, depth), []
    if case == "swapped":
        teachers, err, match = (depth, seg), ModelError, "this is the depth teacher, not the seg teacher"
    elif case == "student_as_teacher":
        from jointdistill.models import build_student, save_model

        student = build_student("tiny", "light", 7)
        save_model(tmp_path / "student.pt", student)
        teachers, err, match = (tmp_path / "student.pt", depth), ModelError, "this is a multi-task model"
    elif case == "architecture":
        record = torch.load(seg / "model.pt", weights_only=True)
        record["config"]["backbone"] = "resnet18"
        torch.save(record, tmp_path / "model.pt")
        teachers, err, match = (tmp_path, depth), ModelError, "weights do not fit its config"
    elif case == "classes":
        record = torch.load(seg / "model.pt", weights_only=True)
        record["classes"] = [*record["classes"][:-1], "bicycle"]
        torch.save(record, tmp_path / "model.pt")
        teachers, err, match = (tmp_path, depth), DataError, "predicts classes .* the prepared data has"
    elif case == "missing":
        teachers, err, match = (seg, tmp_path / "nope"), ModelError, "depth teacher: .*nope: missing"
    elif case == "none":
        teachers, err, match = None, ConfigError, "distill.mode=full needs the two teachers"
    elif case == "probes":
        extra, err, match = ["distill.probe_images=500"], ConfigError, "probe_images=500 exceeds the"
    else:
        extra, err, match = ["distill.top_k=5000"], ConfigError, r"top_k=5000 exceeds the 6×12 feature grid"
    ckpt = tmp_path / "ckpt"
    t0 = time.perf_counter()
    with pytest.raises(err, match=match):
        distill.run(params(*extra), prepared, teachers, tmp_path / "out", ckpt)
    assert not (tmp_path / "out").exists() and not (ckpt / "last.pt").exists()
    assert time.perf_counter() - t0 < 30


def test_unknown_distill_key_and_weight_bounds():
    with pytest.raises(ConfigError, match="distill.alfa: unknown key; did you mean 'distill.alpha'"):
        params("distill.alfa=2")
    with pytest.raises(ConfigError, match="weight_min ≤ 1 ≤ weight_max"):
        params("distill.weight_min=2", "distill.weight_max=3")
    with pytest.raises(ConfigError, match="distill.mode: Input should be"):
        params("distill.mode=eata")


# ----------------------------------------------------------------------------- CLI, resume, DDP
def cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "jointdistill", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sets(*extra):
    return [a for s in [*FAST, "distill.batch_size=2", "distill.checkpoint_every=3", *extra] for a in ("--set", s)]


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_run(prepared, tiny_teachers, tmp_path):
    common = ["distill", "--data", str(prepared), "--teachers", *map(str, tiny_teachers), *sets()]
    ref = cli(*common, "--out", str(tmp_path / "ref"), "--checkpoints", str(tmp_path / "ref-ckpt"))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    assert "student → " in (out := ref.stdout.read()) and "(full: test mIoU " in out

    run = cli(*common, "--out", str(tmp_path / "run"), "--checkpoints", str(tmp_path / "ckpt"))
    # Kill it once a checkpoint exists after the first timeframe (weights and trajectory state in play).
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        ck = tmp_path / "ckpt" / "last.pt"
        try:
            if ck.exists() and torch.load(ck, weights_only=True)["run"]["epoch"] >= 1:
                break
        except Exception:  # being replaced right now
            pass
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run").exists()

    resumed = cli(*common, "--out", str(tmp_path / "run"), "--checkpoints", str(tmp_path / "ckpt"), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"] > 0

    final_ref = torch.load(tmp_path / "ref-ckpt" / "last.pt", weights_only=True)["model"]
    final_run = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("connector.") for k in final_ref)
    for k in final_ref:
        assert torch.equal(final_ref[k], final_run[k]), k
    assert (tmp_path / "run" / "weights.csv").read_text() == (tmp_path / "ref" / "weights.csv").read_text()
    a = pq.read_table(tmp_path / "ref" / "trajectory.parquet").to_pandas()
    b = pq.read_table(tmp_path / "run" / "trajectory.parquet").to_pandas()
    assert a.equals(b)
    ref_report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert report["val"] == ref_report["val"] and report["test"] == ref_report["test"]


@pytest.mark.slow
def test_ddp_two_gloo_processes(prepared, tiny_teachers, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "jointdistill",
            "distill",
            "--data",
            str(prepared),
            "--teachers",
            *map(str, tiny_teachers),
            "--out",
            str(out),
            *sets("distill.epochs=2"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["mode"] == "full"
    assert report["trajectory"]["rows"] == 2 * PROBES * K * 2
    assert len(read_weights(out)) == 2 * 3
    load_model(out / "student.pt")


def test_cli_help_and_errors(tiny_teachers, prepared):
    """In process: the help text and the one-line refusal of teachers given in the wrong order."""
    from typer.testing import CliRunner

    from jointdistill.cli import app

    r = CliRunner().invoke(app, ["distill", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for word in (
        "--data",
        "--teachers",
        "--out",
        "--checkpoints",
        "--resume",
        "distill.mode",
        "distill.alpha",
        "torchrun",
    ):
        assert word in r.stdout, word
    seg, depth = map(str, tiny_teachers)
    args = ["distill", "--params", str(REPO / "params.yaml"), "--data", str(prepared), "--teachers", depth, seg]
    r = CliRunner().invoke(app, [*args, *sets()])
    assert r.exit_code == 2 and r.stderr.startswith("error: seg teacher") and "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit)


def test_bf16_autocast_on_cpu(prepared, tiny_teachers, tmp_path):
    """AMP path (bf16 autocast) end to end: losses are computed in float32, outputs are finite."""
    report = distill.run(params("distill.amp=bf16", "distill.epochs=2"), prepared, tiny_teachers, tmp_path / "o")
    assert report["trajectory"]["rows"] == 2 * PROBES * K * 2
    assert all(v == v for v in (report["test"]["miou"], report["test"]["abs_err"]))  # not NaN
    assert report["history"][-1]["train/traj"] > 0
