"""`dvc repro` for real, in a temporary git repository holding a copy of this project."""

import contextlib
import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

from jointdistill.data.contract import verify_prepared
from jointdistill.provenance import lineage

from .conftest import REPO

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV}, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def set_params(project, section="prepare", **values):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    for part in section.split("."):
        node = node[part]
    node.update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


ALL = {"prepare", "train-teacher@seg", "train-teacher@depth", "distill", "evaluate", "export"}


def ran(out):
    """The stages a `dvc repro` ran (or, with --dry, would run)."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


# The many status checks call DVC's Repo API in this process: the code `dvc status` and `dvc repro --dry` run,
# without starting a DVC process each time (about 2 s each). The CLI itself runs in the tests that change things.
def status(project) -> set[str]:
    """The stages whose own deps, params or outs changed (what `dvc status --json` lists), running nothing."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo() as repo:  # names stages as the CLI does, relative to the cwd
        return set(repo.status())


def would_run(project) -> set[str]:
    """Those stages and everything downstream of them, from DVC's own graph (`dvc repro --dry
    --force-downstream`: nothing runs)."""
    from dvc.repo import Repo

    with contextlib.chdir(project), Repo() as repo:
        return {stage.addressing for stage in repo.reproduce(dry=True, force_downstream=True)}


@pytest.fixture(scope="session")  # shared by both lanes (see conftest)
def project(tmp_path_factory):
    dst = tmp_path_factory.mktemp("dvcproject")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("data/prepared", "dvc.lock")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    set_params(dst, num_samples=30, height=40, width=80, gallery_images=2)
    set_params(dst, "prepare.budget", seg=1.0)
    set_params(dst, "teacher", epochs=1, batch_size=4)
    set_params(dst, "distill", mode="full", epochs=1, batch_size=4, probe_images=2, traj_batch=2, connector_warmup=4)
    # fp32 only: the fp16 and int8 variants are test_export's (tiny_export); here they would double export's time
    set_params(dst, "export", latency_runs=2, parity_images=4, fp16=False, int8="none")
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "project copy"], dst)
    return dst


@pytest.fixture(scope="session")  # shared by both lanes (see conftest)
def reproduced(project):
    """The one whole `dvc repro` of the fast lane; the tests below read it, change inputs and put them back."""
    return run(["dvc", "repro"], project)


def restore(project):
    run(["git", "checkout", "--", "params.yaml", "src"], project)
    assert status(project) == set()


def test_repro_runs_every_stage_and_dvc_reads_its_results(project, reproduced):
    assert ran(reproduced) == ALL
    for task in ("seg", "depth"):
        assert (project / "data" / "teachers" / task / "model.pt").exists()
    assert (project / "data" / "student" / "student.pt").exists()
    assert {p.name for p in (project / "data" / "export").iterdir()} >= {"student.onnx", "parity.json", "MODEL_CARD.md"}
    # Metrics: numbers only, beside the outputs (metrics/, in git), one narrow table.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project))
    (workspace,) = shown.values()
    evaluated = workspace["data"]["metrics/evaluate/metrics.json"]["data"]
    assert {"miou", "pixacc", "abs_err", "rel_err", "delta1", "delta_m", "flops_ratio"} == set(evaluated)
    assert set(workspace["data"]["metrics/export/metrics.json"]["data"]) == {"size_mb"}
    for folder in (project / "metrics").iterdir():
        values = json.loads((folder / "metrics.json").read_text()).values()
        assert all(isinstance(v, (int, float)) for v in values), folder
    table = run(["dvc", "metrics", "show"], project)
    assert max(map(len, table.splitlines())) <= 150, table
    plots = run(["dvc", "plots", "show", "--json"], project)
    assert "metrics/teacher-seg/dvclive/plots/metrics/val/miou.tsv" in plots and "abs_err" in plots
    assert {"per-class-iou", "teacher-weights-per-timeframe", "trajectory-loss", "depth-error-vs-distance"} <= set(
        json.loads(plots)["data"]
    )
    assert not json.loads(plots).get("errors")
    values = json.loads(plots)["data"]["teacher-weights-per-timeframe"][0]["content"]["data"]["values"]
    assert {v["field"] for v in values} == {"omega_seg", "omega_depth"}
    assert abs(sum(float(v["dvc_inferred_y_value"]) for v in values if v["timeframe"] == "0") - 2.0) < 1e-6
    exp = run(["dvc", "exp", "show", "--json"], project)
    assert "miou" in exp and "abs_err" in exp and '"lr": 0.002' in exp
    # Per-class IoU: one file (one colour) per model; depth error: one line per model.
    per_class = json.loads(plots)["data"]["per-class-iou"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in per_class} == {"student.csv", "teacher_seg.csv"}
    depth = json.loads(plots)["data"]["depth-error-vs-distance"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in depth} == {"student.csv", "teacher_depth.csv"}

    meta = verify_prepared(project / "data" / "prepared", check_digests=True)
    assert meta["resolution"] == [40, 80] and sum(meta["counts"].values()) == 30
    for out in ("prepared", "teachers/seg", "student", "eval", "export"):  # the embedded data, named as such
        assert lineage.read(project / "data" / out)["data"] == {"kind": "synthetic"}, out
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["prepare"]["height"] == 40
    assert {d["path"] for d in lock["stages"]["prepare"]["deps"]} >= {
        "src/jointdistill/data/sources/street_scenes.py",
        "src/jointdistill/stages/prepare.py",
    }

    # Nothing changed: nothing runs, nothing is rewritten.
    stamp = (project / "data" / "prepared" / "meta.json").stat().st_mtime_ns
    out = run(["dvc", "repro"], project)
    assert "didn't change, skipping" in out and not ran(out)
    assert (project / "data" / "prepared" / "meta.json").stat().st_mtime_ns == stamp
    assert "up to date" in run(["dvc", "status"], project)


def test_summary_shows_each_output_with_the_headline_its_stage_printed(project, reproduced):
    """`jointdistill summary` (the end of `make run`) reads each output back as the typed result its stage
    returned, run facts included (the export's latency comes from metrics/export/run.json)."""
    from typer.testing import CliRunner

    from jointdistill.cli import app
    from jointdistill.stages import results

    r = CliRunner().invoke(app, ["summary", "--data", str(project / "data"), "--metrics", str(project / "metrics")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    expected = [
        ("prepared data", results.PrepareResult, "prepared", "prepare"),
        ("teacher seg", results.TeacherResult, "teachers/seg", "teacher-seg"),
        ("teacher depth", results.TeacherResult, "teachers/depth", "teacher-depth"),
        ("student", results.StudentResult, "student", "distill"),
        ("evaluation", results.EvaluationResult, "eval", "evaluate"),
        ("ONNX student", results.ExportResult, "export", "export"),
    ]
    for label, kind, folder, stage in expected:
        result = kind.read(project / "data" / folder, project / "metrics" / stage)
        assert result is not None, folder
        line = next(line for line in lines if line.startswith(f"{label:<14}:"))
        assert line.endswith(f"({result.headline()})"), line
    assert "test mIoU" in lines[1] and "baseline" in lines[1]  # the seg teacher against its trivial baseline
    assert "ms/image at batch 1" in next(line for line in lines if line.startswith("ONNX student"))
    assert results.TeacherResult.read(project / "data" / "nothing-here") is None


def test_a_result_read_back_is_the_report_with_its_run_facts():
    """`records.split` takes a report's run facts out (to run.json); reading a result puts them back."""
    from jointdistill.provenance import records
    from jointdistill.stages.results import StudentResult, _merged

    report = {
        "mode": "full",
        "test": {"miou": 0.5, "abs_err": 3.0},
        "train_seconds": 12.5,
        "trajectory": {"rows": 48, "logging_seconds": 0.2},
        "history": [{"epoch": 1, "train/images_per_second": 9.0}],
    }
    content, run_facts = records.split(report)
    assert "train_seconds" not in content and run_facts["trajectory"] == {"logging_seconds": 0.2}
    assert _merged(content, run_facts) == report
    result = StudentResult(report)
    assert json.loads(json.dumps(result)) == report and result["test"]["miou"] == 0.5


def test_the_student_line_names_omega_only_where_it_moved():
    """`make run`'s student line: ω appears for the adaptive modes, not for mtl, whose ω is a constant 1."""
    from jointdistill.stages.results import StudentResult

    test = {"miou": 0.5, "pixacc": 0.9, "abs_err": 3.0, "rel_err": 0.2}
    final = {"seg": 0.9, "depth": 1.1}
    mtl = StudentResult({"mode": "mtl", "test": test, "weights": {"final": {"seg": 1.0, "depth": 1.0}, "history": []}})
    full = StudentResult({"mode": "full", "test": test, "weights": {"final": final, "history": [{"timeframe": 1}]}})
    assert mtl.headline() == "mtl: test mIoU 0.5000, pixAcc 0.9000, AbsErr 3.000 m, RelErr 0.2000"
    assert full.headline() == mtl.headline().replace("mtl", "full") + "; final ω: seg 0.900, depth 1.100"


TRAINING = {"distill", "evaluate", "export"}


@pytest.mark.parametrize(
    ("section", "values", "changed", "reruns"),
    [
        ("evaluate", {"qualitative_images": 2}, {"evaluate"}, {"evaluate"}),
        ("export", {"latency_runs": 3}, {"export"}, {"export"}),
        # evaluate also reads the sections that made the models it reports on (config.STAGE_PARAMS)
        ("distill", {"alpha": 1.0}, {"distill", "evaluate"}, TRAINING),
        ("teacher.seg", {"lr": 0.01}, {"train-teacher@seg", "evaluate"}, {"train-teacher@seg", *TRAINING}),
        ("teacher", {"weight_decay": 0.001}, ALL - {"prepare", "distill", "export"}, ALL - {"prepare"}),
        ("prepare", {"height": 32}, {"prepare", "evaluate"}, ALL),
    ],
    ids=["evaluate", "export", "distill", "teacher.seg", "teacher", "prepare"],
)
def test_a_params_change_invalidates_its_stages_and_what_follows(project, reproduced, section, values, changed, reruns):
    """DVC's own view after a change to params.yaml: the stages that read the key (`dvc status`), and those with
    everything after them (`dvc repro --dry --force-downstream`), without running anything."""
    set_params(project, section, **values)
    try:
        assert status(project) == changed
        assert would_run(project) == reruns
    finally:
        restore(project)


@pytest.mark.parametrize(
    ("path", "changed"),
    [
        # the training loop: both teachers and the student; where they run (devices): evaluate too, which runs the
        # models there; export re-runs only when the student it reads changes (`would_run` covers that)
        ("training/engine.py", {"train-teacher@seg", "train-teacher@depth", "distill"}),
        ("training/devices.py", ALL - {"prepare", "export"}),
        ("distill/weights.py", {"distill"}),  # the method
        ("distill/plan.py", {"distill"}),
        ("evaluation/templates.py", {"evaluate", "export"}),  # the report and the model card
        ("serving/infer.py", {"export"}),
    ],
)
def test_a_code_change_invalidates_the_stages_that_import_it(project, reproduced, path, changed):
    with open(project / "src" / "jointdistill" / path, "a") as fh:
        fh.write("\n# a change\n")
    try:
        assert status(project) == changed
    finally:
        restore(project)


def test_a_code_change_that_keeps_the_data_reruns_prepare_and_nothing_downstream(project, reproduced):
    """A comment in prepare's code: DVC sees prepare's deps change, re-runs it, gets byte-identical data (the
    lineage names code by its syntax tree, not by bytes or git commit) and so re-runs nothing downstream."""
    with open(project / "src" / "jointdistill" / "stages" / "prepare.py", "a") as fh:
        fh.write("\n# a note that changes no behaviour\n")
    try:
        status = json.loads(run(["dvc", "status", "--json"], project))
        assert set(status) == {"prepare"}, status
        assert status["prepare"] == [{"changed deps": {"src/jointdistill/stages/prepare.py": "modified"}}]
        assert ran(run(["dvc", "repro"], project)) == {"prepare"}
        assert json.loads(run(["dvc", "status", "--json"], project)) == {}
    finally:
        run(["git", "checkout", "--", "src"], project)
        run(["dvc", "commit", "-f", "prepare"], project)  # the same outputs, recorded against the restored code


@pytest.mark.slow
def test_a_queued_grid_runs_in_dvcs_queue_and_exp_show_lists_each_result(project, reproduced):
    """`dvc exp run --queue -S KEY=A,B` queues one experiment per value, `dvc queue start -j 1` runs them in the
    background, and `dvc exp show` lists each with its own params and metrics. The runs differ because every key
    a stage reads is one of its DVC params: a key that was not would let DVC's run cache hand both the same
    result."""
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "reproduced"], project)  # the queue's baseline: the reproduced pipeline
    try:
        # A grid over prepare (the cheapest stage to re-run); a student's key queues the same way.
        queued = run(["dvc", "exp", "run", "--queue", "-S", "prepare.num_samples=24,36", "prepare"], project)
        assert queued.count("Queued experiment") == 2, queued
        run(["dvc", "queue", "start", "-j", "1"], project)
        deadline = time.monotonic() + 300
        # Waiting reads git refs (cheap, unlike a dvc command every few seconds beside the worker): each finished
        # experiment is a commit under refs/exps/<baseline>/.
        while len(_finished(project)) < 2:
            assert time.monotonic() < deadline, run(["dvc", "queue", "status"], project)
            time.sleep(2)
        states = _experiment_states(project)
        assert sorted(states.values()) == ["success", "success"], (states, run(["dvc", "queue", "status"], project))
        results = {}
        for commit in json.loads(run(["dvc", "exp", "show", "--json"], project)):
            for exp in commit.get("experiments") or []:
                data = exp["revs"][0]["data"]
                n = data["params"]["params.yaml"]["data"]["prepare"]["num_samples"]
                results[n] = data["outs"]["data/prepared"]["hash"]
        assert set(results) == {24, 36}, results
        assert results[24] != results[36]  # two runs, not one cached result read twice
        assert status(project) == set()  # the workspace is the reproduced baseline still
    finally:
        run(["dvc", "queue", "stop", "--kill"], project)
        run(["dvc", "exp", "remove", "--all-commits"], project)
        run(["git", "reset", "-q", "--soft", "HEAD~1"], project)


def _finished(project) -> list[str]:
    head = run(["git", "rev-parse", "HEAD"], project).strip()
    refs = run(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/{head[:2]}/{head[2:]}/"], project)
    return refs.split()


def _experiment_states(project) -> dict[str, str]:
    """Each queued experiment's executor state in `dvc exp show --json` (queued, running, success, failed)."""
    states = {}
    for commit in json.loads(run(["dvc", "exp", "show", "--json"], project)):
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            states[rev["rev"]] = (rev.get("executor") or {}).get("state") or "success"
    return states


@pytest.mark.slow
def test_a_forced_rerun_gives_the_same_bytes(project, reproduced):
    """The same inputs give byte-identical outputs: a forced re-run leaves every data/ hash in dvc.lock as it was
    (the run-dependent files are in metrics/, outside the hashed outputs). The stages that train are left out:
    two runs of each give bit-identical weights in the kill-and-resume tests (test_teacher, test_distill_stage),
    so here the data, the evaluation and the exported files are re-made from them."""

    def hashes():
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for s in lock.values() for o in s["outs"] if o["path"].startswith("data/")}

    before = hashes()
    declared = [project / "metrics" / stage / "metrics.json" for stage in ("evaluate", "export")]
    metrics = {p: p.read_bytes() for p in declared}
    rerun = {"prepare", "evaluate", "export"}
    assert ran(run(["dvc", "repro", "-f", "-s", *sorted(rerun)], project)) == rerun
    assert hashes() == before
    # The declared metrics hold no timing either: the same bytes, so DVC's run cache keeps one entry per run.
    assert {p: p.read_bytes() for p in declared} == metrics


@pytest.mark.slow
def test_fresh_clone_prepares_the_data_the_committed_lock_names(tmp_path):
    """`make run` in a fresh clone: prepare, at the committed params, gives exactly the data/prepared hash that
    the committed dvc.lock records. Floats may differ in the last bits between CPU models, so the check runs on
    the kind of machine that made the lock (metrics/prepare/run.json says which)."""
    from jointdistill.provenance.records import machine

    made_on = json.loads((REPO / "metrics" / "prepare" / "run.json").read_text())["machine"]["cpu"]
    if made_on != machine()["cpu"]:
        pytest.skip(f"dvc.lock was made on {made_on!r}; this machine is {machine()['cpu']!r}")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    run(["dvc", "repro", "--single-item", "prepare"], clone)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["prepare"]
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["outs"][0] == committed["outs"][0]


def test_every_stage_declares_deps_params_outs():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in spec["stages"].items():
        items = stage.get("foreach", [None])
        stage = stage.get("do", stage)
        assert stage.get("deps") and stage.get("outs"), name
        assert stage.get("params"), name
        for item in items:
            for dep in stage["deps"]:
                dep = dep.replace("${item}", str(item))
                assert (REPO / dep).exists() or dep.startswith("data/"), f"{name}: dep {dep} does not exist"
            for key in stage["params"]:
                node = params
                for part in key.replace("${item}", str(item)).split("."):
                    assert part in node, f"{name}: param {key} is not in params.yaml"
                    node = node[part]


def test_teacher_stages_track_every_teacher_param():
    from jointdistill.config import TrainParams

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train-teacher"]["do"]
    tracked = {p.split(".", 1)[1] for p in spec["params"] if p.startswith("teacher.")}
    assert tracked == set(TrainParams.model_fields) | {"${item}"}


@pytest.mark.slow
def test_gcs_remote_push_then_repro_pull_elsewhere_runs_nothing(project, gcs_emulator, tmp_path):
    """A `gs://` DVC remote (dvc-gs) on the emulator: push outputs and the run cache, then on a fresh clone
    `dvc repro --pull` restores every stage instead of re-running it, with and without a committed dvc.lock."""
    from .conftest import make_bucket

    make_bucket("dvc-remote")
    run(["dvc", "repro"], project)
    run(["dvc", "remote", "add", "-f", "-d", "gcs", "gs://dvc-remote/jointdistill"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "outputs and a gs remote"], project)
    pushed = run(["dvc", "push", "--run-cache"], project)
    assert "pushed" in pushed

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    out = run(["dvc", "repro", "--pull"], clone)
    assert not ran(out), out
    assert (clone / "data" / "export" / "student.onnx").read_bytes() == (
        project / "data" / "export" / "student.onnx"
    ).read_bytes()
    assert "up to date" in run(["dvc", "status"], clone)

    # Without dvc.lock, only the run cache knows these stages already ran with these deps and params.
    bare = tmp_path / "bare"
    run(["git", "clone", "-q", str(project), str(bare)], tmp_path)
    (bare / "dvc.lock").unlink()
    out = run(["dvc", "repro", "--pull"], bare)
    assert not ran(out), out
    assert (bare / "data" / "student" / "student.pt").exists()
