"""The train-teacher stage and the engine under it: outputs, quality vs trivial baselines, resume after
SIGKILL, DDP with two gloo processes, and bad checkpoints."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from jointdistill.config import load_params
from jointdistill.errors import DataError, ModelError
from jointdistill.models import load_model
from jointdistill.provenance import records
from jointdistill.stages import teacher
from jointdistill.training.objectives import Objective

from .conftest import REPO, TINY

FAST = [*TINY, "teacher.batch_size=4", "teacher.epochs=3", "teacher.checkpoint_every=3"]
ENV = {**os.environ, "JOINTDISTILL_PROGRESS": "off", "OMP_NUM_THREADS": "1"}


def params(*extra):
    return load_params(REPO / "params.yaml", [*FAST, *extra])


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    reports = {t: teacher.run(params(), t, prepared, root / t) for t in ("seg", "depth")}
    return root, reports


def test_outputs(trained):
    root, reports = trained
    for task, key in (("seg", "miou"), ("depth", "abs_err")):
        out = root / task
        metrics = json.loads((out / "report.json").read_text())
        assert metrics == json.loads(json.dumps(records.split(reports[task])[0]))
        curated = json.loads((out / "metrics.json").read_text())
        assert set(curated) == {*(("miou", "pixacc") if task == "seg" else ("abs_err", "rel_err", "delta1")), "seconds"}
        assert json.loads((out / "run.json").read_text())["machine"]["cores"] >= 1
        assert metrics["monitor"] == key and 1 <= metrics["best_epoch"] <= 3
        assert {"val", "test", "baseline"} <= set(metrics)
        model, record = load_model(out / "model.pt")
        assert record["task"] == task and record["classes"][0] == "flat"
        assert set(model(torch.zeros(1, 3, 48, 96))) == {"features", task}
        assert (out / "dvclive" / "plots" / "metrics" / "val" / f"{key}.tsv").exists()
    assert {"miou", "pixacc", "per_class_iou"} <= set(reports["seg"]["test"])
    assert {"abs_err", "rel_err", "delta1"} <= set(reports["depth"]["test"])


def test_teachers_beat_trivial_baselines(trained):
    _, reports = trained
    seg, depth = reports["seg"], reports["depth"]
    assert seg["test"]["miou"] > seg["baseline"]["test"]["miou"] + 0.05
    assert depth["test"]["abs_err"] < depth["baseline"]["test"]["abs_err"]


def cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "jointdistill", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def sets(*extra):
    return [
        a
        for s in [*FAST, "teacher.epochs=4", "teacher.batch_size=2", "teacher.checkpoint_every=2", *extra]
        for a in ("--set", s)
    ]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_weights(prepared, tmp_path):
    common = ["train-teacher", "--task", "seg", "--data", str(prepared), *sets()]
    ref = cli(*common, "--out", str(tmp_path / "ref"), "--checkpoints", str(tmp_path / "ref-ckpt"))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()

    run = cli(*common, "--out", str(tmp_path / "run"), "--checkpoints", str(tmp_path / "ckpt"))
    deadline = time.time() + 300
    while not (tmp_path / "ckpt" / "last.pt").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run").exists()

    resumed = cli(*common, "--out", str(tmp_path / "run"), "--checkpoints", str(tmp_path / "ckpt"), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    resumed_from = json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from_step"]
    assert resumed_from is not None and resumed_from > 0

    final_ref = torch.load(tmp_path / "ref-ckpt" / "last.pt", weights_only=True)["model"]
    final_run = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["model"]
    for k in final_ref:
        assert torch.equal(final_ref[k], final_run[k]), k
    best_ref = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    best_run = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(best_ref[k], best_run[k]) for k in best_ref)
    assert report["val"] == json.loads((tmp_path / "ref" / "report.json").read_text())["val"]
    # The training curves after the resume: one row per validation, steps 0..3, none repeated.
    with open(tmp_path / "run" / "dvclive" / "plots" / "metrics" / "val" / "miou.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [0, 1, 2, 3]
    # The per-epoch history (train loss means, val metrics) matches too; only throughput may differ.
    hist_ref = torch.load(tmp_path / "ref-ckpt" / "last.pt", weights_only=True)["run"]["history"]
    hist_run = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)["run"]["history"]
    for a, b in zip(hist_ref, hist_run, strict=True):
        assert {k: v for k, v in a.items() if "per_second" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "per_second" not in k}
        )


@pytest.mark.slow
def test_ddp_two_gloo_processes(prepared, tmp_path):
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
            "train-teacher",
            "--task",
            "depth",
            "--data",
            str(prepared),
            "--out",
            str(out),
            *sets("teacher.epochs=2"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["test"]["abs_err"] < report["baseline"]["test"]["abs_err"] * 1.5
    load_model(out / "model.pt")


def test_checkpoint_of_other_params_is_not_resumed(prepared, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    teacher.run(params("teacher.epochs=1"), "seg", prepared, tmp_path / "a", ckpt)
    report = teacher.run(
        params("teacher.epochs=1", "teacher.lr=0.01"), "seg", prepared, tmp_path / "b", ckpt, resume=True
    )
    assert report["resumed_from_step"] is None
    assert "made with other params, data or code; starting afresh" in caplog.text
    again = teacher.run(
        params("teacher.epochs=1", "teacher.lr=0.01"), "seg", prepared, tmp_path / "c", ckpt, resume=True
    )
    assert again["resumed_from_step"] is not None  # same params: the finished run is picked up, not redone


def test_corrupt_checkpoint_is_a_clear_error(prepared, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match=r"checkpoint .*last.pt: unreadable"):
        teacher.run(params("teacher.epochs=1"), "seg", prepared, tmp_path / "out", ckpt, resume=True)
    torch.save({"format": "other"}, ckpt / "last.pt")
    with pytest.raises(ModelError, match="not a jointdistill checkpoint file"):
        teacher.run(params("teacher.epochs=1"), "seg", prepared, tmp_path / "out", ckpt, resume=True)
    assert not (tmp_path / "out").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="meta.json: missing"):
        teacher.run(params(), "seg", tmp_path / "nothing", tmp_path / "out")


def test_cli_bad_params_and_help():
    """In process: the command's option parsing and error lines (the subprocess tests above run the real thing)."""
    from typer.testing import CliRunner

    from jointdistill.cli import app

    params = ["--params", str(REPO / "params.yaml")]
    r = CliRunner().invoke(app, ["train-teacher", *params, "--task", "seg", "--set", "teacher.seg.lr=-1"])
    assert r.exit_code == 2 and "teacher.seg.lr: Input should be greater than 0" in r.stderr
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["train-teacher", *params, "--task", "seg", "--set", "teacher.backbone=vgg"])
    assert r.exit_code == 2 and "teacher.backbone: Input should be 'tiny'" in r.stderr
    r = CliRunner().invoke(app, ["train-teacher", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for word in ("--task", "--data", "--out", "--checkpoints", "--resume", "teacher.epochs", "torchrun"):
        assert word in r.stdout, word


def test_fresh_run_removes_only_its_own_files(prepared, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("keep me")
    torch.save({"format": "old"}, ckpt / "last.pt")
    teacher.run(params("teacher.epochs=1"), "depth", prepared, tmp_path / "out", ckpt)
    assert (ckpt / "notes.txt").read_text() == "keep me"
    assert torch.load(ckpt / "last.pt", weights_only=True)["format"].startswith("jointdistill.checkpoint")


class CountingObjective(Objective):
    """A seg objective with the timeframe hook and state overridden, as the student's objective has them."""

    monitor, higher_is_better = "miou", True

    def __init__(self):
        from jointdistill.training.objectives import SegObjective

        self.inner = SegObjective(7)
        self.calls = []

    def loss(self, outputs, batch):
        return self.inner.loss(outputs, batch)

    def new_meters(self):
        return self.inner.new_meters()

    def update(self, meters, outputs, batch):
        self.inner.update(meters, outputs, batch)

    def compute(self, meters):
        return self.inner.compute(meters)

    def end_timeframe(self, timeframe, step, val, model):
        self.calls.append((timeframe, step, round(val["miou"], 6)))
        return {"hook/calls": float(len(self.calls))}

    def state_dict(self):
        return {"calls": list(self.calls)}

    def load_state_dict(self, state):
        self.calls = [tuple(c) for c in state["calls"]]


def test_engine_objective_hooks_run_each_timeframe_and_resume_with_their_state(prepared, tmp_path):
    from jointdistill.data.prepared import PreparedDataset
    from jointdistill.models import build_teacher
    from jointdistill.training.engine import fit

    spec = params("teacher.epochs=2").teacher.for_task("seg")
    train, val = PreparedDataset(prepared, "train"), PreparedDataset(prepared, "val")
    task = CountingObjective()
    result = fit(build_teacher("seg", "tiny", "light", 7), task, train, val, spec, 0, tmp_path / "run", "d1")
    assert [c[0] for c in task.calls] == [1, 2] and task.calls[1][1] == 2 * (len(train) // 4)
    assert [h["hook/calls"] for h in result.history] == [1.0, 2.0]
    assert task.calls[-1][2] == round(result.history[-1]["val/miou"], 6)
    resumed = CountingObjective()
    fit(build_teacher("seg", "tiny", "light", 7), resumed, train, val, spec, 0, tmp_path / "run", "d1", resume=True)
    assert resumed.calls == task.calls  # restored from the checkpoint; the finished run adds no timeframe
