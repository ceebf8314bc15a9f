"""Fetching a pinned version of a DVC-tracked dataset: a real git + DVC project made here, two revisions of a
tiny dataset pushed to a DVC remote on the GCS emulator, fetched back with DVC's API and checked."""

import json
import os
import re
import subprocess
import sys

import pytest

from jointdistill.cloud.pinned import fetch
from jointdistill.errors import DataError

from .conftest import make_bucket

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]


def run(cwd, *cmd):
    r = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "DVC_NO_ANALYTICS": "1"}
    )
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    return r.stdout.strip()


def dvc(cwd, *args):
    return run(cwd, sys.executable, "-m", "dvc", *args)


def new_project(tmp_path_factory, name: str, bucket: str):
    """An empty git + DVC project whose default remote is gs://BUCKET/dvc on the emulator."""
    make_bucket(bucket)
    root = tmp_path_factory.mktemp(name) / "proj"
    root.mkdir()
    run(root, *GIT, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "store", f"gs://{bucket}/dvc")
    return root


@pytest.fixture(scope="module")
def project(gcs_emulator, tmp_path_factory):
    """A DVC project with tags A (3 files) and B (one changed, one added), both pushed, and C (committed, not
    pushed); the remote is gs://pinned-store on the emulator. Returns (path, {tag: commit})."""
    root = new_project(tmp_path_factory, "dvcproject", "pinned-store")
    data = root / "data" / "raw"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "b.bin").write_bytes(bytes(range(256)) * 10)
    (data / "sub" / "c.txt").write_text("gamma\n")
    (root / "notes.txt").write_text("plain git file\n")
    commits = {}
    for tag, change in (("A", None), ("B", "changed"), ("C", "unpushed")):
        if change == "changed":
            (data / "a.txt").write_text("alpha, revised\n")
            (data / "d.txt").write_text("delta\n")
        elif change == "unpushed":
            (data / "e.txt").write_text("never pushed\n")
        dvc(root, "add", "-q", "data/raw")
        if change != "unpushed":
            dvc(root, "push", "-q")
        run(root, *GIT, "add", "-A")
        run(root, *GIT, "commit", "-q", "-m", tag)
        run(root, *GIT, "tag", tag)
        commits[tag] = run(root, "git", "rev-parse", "HEAD")
    return root, commits


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_revisions_fetch_their_own_data(project, tmp_path):
    root, commits = project
    # As a git URL (cloned; the data comes from the GCS remote), and as a local checkout (its cache serves).
    a = fetch(root.as_uri(), "A", "data/raw", tmp_path / "a")
    b = fetch(str(root), "B", "data/raw", tmp_path / "b")
    assert (a["commit"], b["commit"]) == (commits["A"], commits["B"])
    assert a["md5"].endswith(".dir") and a["md5"] != b["md5"]
    recorded = {
        tag: json.loads(json.dumps(__import__("yaml").safe_load(run(root, "git", "show", f"{tag}:data/raw.dvc"))))[
            "outs"
        ][0]["md5"]
        for tag in ("A", "B")
    }
    assert (a["md5"], b["md5"]) == (recorded["A"], recorded["B"])  # the md5 the .dvc file holds at that rev
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert sorted(ta) == ["a.txt", "b.bin", "sub/c.txt"] and sorted(tb) == ["a.txt", "b.bin", "d.txt", "sub/c.txt"]
    assert ta["a.txt"] == b"alpha\n" and tb["a.txt"] == b"alpha, revised\n"
    assert a["files"] == 3 and a["bytes"] == sum(len(v) for v in ta.values())
    # Again, by commit instead of tag: byte for byte the same.
    again = fetch(root.as_uri(), commits["A"], "data/raw", tmp_path / "a2")
    assert _tree(tmp_path / "a2") == ta and again["md5"] == a["md5"]


def test_a_single_tracked_file_and_the_cli(project, tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    root, commits = project
    r = CliRunner().invoke(
        app,
        [
            "fetch-data",
            str(root),
            "--rev",
            "B",
            "--path",
            "data/raw/d.txt",
            "--out",
            str(tmp_path / "one"),
            "--provenance",
            str(tmp_path / "prov.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads(r.output.strip().splitlines()[-1])
    assert record["commit"] == commits["B"] and record["type"] == "file" and record["files"] == 1
    assert json.loads((tmp_path / "prov.json").read_text()) == record
    assert (tmp_path / "one" / "d.txt").read_text() == "delta\n"


@pytest.mark.parametrize(
    "rev, path, message",
    [
        ("no-such-tag", "data/raw", "unknown revision"),
        ("A", "data/nothing", "no 'data/nothing' in the project"),
        ("A", "notes.txt", "is not tracked by DVC"),
        ("C", "data/raw", "could not be downloaded from the project's remote"),
    ],
)
def test_bad_pins_are_one_clear_error_and_write_nothing(project, tmp_path, rev, path, message):
    root, _ = project
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old.txt").write_text("previous")
    with pytest.raises(DataError, match=message):
        fetch(root.as_uri(), rev, path, tmp_path / "keep")  # a git URL: cloned, data from the remote only
    assert _tree(tmp_path / "keep") == {"old.txt": b"previous"}


def test_a_corrupt_remote_copy_is_caught(project, tmp_path):
    """The object for a.txt at A replaced on the remote by other bytes: DVC or our check must refuse it."""
    from google.cloud import storage

    root, _ = project
    md5 = __import__("hashlib").md5(b"alpha\n").hexdigest()
    blob = storage.Client().bucket("pinned-store").blob(f"dvc/files/md5/{md5[:2]}/{md5[2:]}")
    assert blob.exists()
    original = blob.download_as_bytes()
    blob.upload_from_string(b"tampered\n")
    try:
        with pytest.raises(DataError, match="checksum mismatch|could not be downloaded"):
            fetch(root.as_uri(), "A", "data/raw", tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    finally:
        blob.upload_from_string(original)


def test_an_unreachable_remote(tmp_path):
    """The project is fine, its remote does not answer (nothing listens on the port): one DataError, nothing
    written."""
    root = tmp_path / "proj"
    root.mkdir()
    run(root, *GIT, "init", "-q")
    dvc(root, "init", "-q")
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("a\n")
    dvc(root, "add", "-q", "data")
    dvc(root, "remote", "add", "-d", "gone", "http://127.0.0.1:9/dvc")
    run(root, *GIT, "add", "-A")
    run(root, *GIT, "commit", "-q", "-m", "A")
    with pytest.raises(DataError, match="could not be downloaded from the project's remote.*reach the remote"):
        fetch(root.as_uri(), "HEAD", "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_project_that_is_not_there(tmp_path):
    with pytest.raises(DataError, match="not a reachable DVC project|unknown revision"):
        fetch(str(tmp_path / "missing-project"), "A", "data/raw", tmp_path / "out")


# ----------------------------------------------------------------------------- the pipeline's first steps
def _frames(folder, n, seed):
    """A folder-format dataset (`prepare.dataset: folder`): n RGB frames 48×96, labels of 3 classes, depth PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "classes.yaml").write_text("classes: [road, car, sky]\n")
    for kind in ("images", "labels", "depth"):
        (folder / "train" / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stem = f"f{i:03d}"
        t = folder / "train"
        Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(t / "images" / f"{stem}.png")
        Image.fromarray(rng.integers(0, 3, (48, 96), dtype=np.uint8)).save(t / "labels" / f"{stem}.png")
        Image.fromarray(rng.integers(1000, 30000, (48, 96), dtype=np.uint16)).save(t / "depth" / f"{stem}.png")


@pytest.fixture(scope="session")  # shared by both lanes (see conftest)
def image_project(gcs_emulator, tmp_path_factory):
    """A DVC project whose data/raw/street is a folder-format dataset: 30 frames at tag A, 36 (6 added, one
    replaced) at tag B; both pushed to gs://pinned-images."""
    root = new_project(tmp_path_factory, "imgproject", "pinned-images")
    data = root / "data" / "raw" / "street"
    data.mkdir(parents=True)
    _frames(data, 30, seed=1)
    for tag in ("A", "B"):
        if tag == "B":
            _frames(data, 36, seed=2)
        dvc(root, "add", "-q", "data/raw/street")
        dvc(root, "push", "-q")
        run(root, *GIT, "add", "-A")
        run(root, *GIT, "commit", "-q", "-m", tag)
        run(root, *GIT, "tag", tag)
    return root


@pytest.mark.slow
def test_kfp_source_and_prepare_steps_pinned_to_two_revisions(image_project, tmp_path, capfd):
    """The pipeline's real `source` and `prepare` components run by kfp.local: A and B give different prepared
    data whose lineage names them; A again gives A's arrays byte for byte; a bad pin fails in the source step."""
    import numpy as np
    import pandas as pd
    from jointdistill.components import prepare as prepare_component
    from jointdistill.components import source as source_component
    from jointdistill.pipelines.pipeline import pipeline_params
    from kfp import dsl, local

    from jointdistill.config import load_params
    from jointdistill.provenance import lineage

    from .conftest import REPO

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    source_op, prepare_op = source_component.component("unused"), prepare_component.component("unused")
    p = load_params(
        REPO / "params.yaml",
        [
            "prepare.dataset=folder",
            "prepare.budget.seg=1.0",
            "prepare.height=48",
            "prepare.width=96",
            "prepare.gallery_images=0",
        ],
    )

    @dsl.pipeline(name="pinned-data")  # the first two steps of the pipeline, wired as it wires them
    def first_steps(params: dict, data_repo: str, data_rev: str, data_path: str) -> dsl.Dataset:
        src = source_op(repo=data_repo, rev=data_rev, path=data_path)
        return prepare_op(params=params, source=src.outputs["data"]).outputs["prepared"]

    url = image_project.as_uri()
    runs = {}
    for name, rev in (("A", "A"), ("B", "B"), ("A again", "A")):
        task = first_steps(params=pipeline_params(p), data_repo=url, data_rev=rev, data_path="data/raw/street")
        runs[name] = task.output.path
    commits = {t: run(image_project, "git", "rev-parse", t) for t in ("A", "B")}
    for name, tag in (("A", "A"), ("B", "B"), ("A again", "A")):
        lin = lineage.read(runs[name])
        assert lin["stage"] == "prepare" and lin["data"]["kind"] == "dvc"
        got = (lin["data"]["rev"], lin["data"]["commit"], lin["data"]["path"])
        assert got == (tag, commits[tag], "data/raw/street")
        assert lin["data"]["repo"] == url and lin["data"]["md5"].endswith(".dir")
    assert lineage.read(runs["A"])["data"]["md5"] != lineage.read(runs["B"])["data"]["md5"]
    manifest = {n: pd.read_parquet(f"{runs[n]}/manifest.parquet") for n in runs}
    assert len(manifest["A"]) == 30 and len(manifest["B"]) == 36
    assert set(manifest["A"]["sha256"]) != set(manifest["B"]["sha256"])
    for split in ("train", "val", "test"):
        for array in ("images", "labels", "depth"):
            a, again = (np.load(f"{runs[n]}/{split}/{array}.npy") for n in ("A", "A again"))
            assert a.tobytes() == again.tobytes() and a.dtype == again.dtype and a.shape == again.shape
    assert manifest["A"]["sha256"].tolist() == manifest["A again"]["sha256"].tolist()

    capfd.readouterr()
    with pytest.raises(RuntimeError, match="source"):  # kfp.local: the source task failed, prepare never ran
        first_steps(params=pipeline_params(p), data_repo=url, data_rev="no-such-tag", data_path="data/raw/street")
    log = re.sub(r"\x1b\[[0-9;]*m", "", "".join(capfd.readouterr()))  # kfp.local colours task names
    assert "Task 'source' finished with status FAILURE" in log
    assert "DataError" in log and "unknown revision" in log and "Task 'prepare'" not in log


def test_local_data_lineage_and_folder_digests(project, tmp_path):
    from jointdistill.provenance import lineage

    root, commits = project
    head = run(root, "git", "rev-parse", "HEAD")
    rec = lineage.local_data(root / "data" / "raw")  # a DVC-tracked folder of a checkout: its md5 (no commit)
    recorded = __import__("yaml").safe_load((root / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert rec == {"kind": "dvc", "repo": None, "rev": None, "commit": None, "path": "data/raw", "md5": recorded}
    assert head  # the checkout has a commit; the record leaves it out
    (tmp_path / "plain").mkdir()
    assert lineage.local_data(tmp_path / "plain") == {"kind": "untracked", "path": "plain"}
    assert lineage.local_data(None) == {"kind": "synthetic"}
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.bin").write_bytes(b"1")
    (a / "sub" / "y.bin").write_bytes(b"2")
    before = lineage.folder_digest(a)
    (a / "lineage.json").write_text("{}")  # its own record is not part of a folder's content
    assert lineage.folder_digest(a) == before
    (a / "sub" / "y.bin").write_bytes(b"3")
    assert lineage.folder_digest(a) != before and before.startswith("sha256:")


# ----------------------------------------------------------------------------- results back into DVC
def _files(folder):
    from pathlib import Path

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_whole_pipeline_under_kfp_local_pinned_then_results_pulled_into_a_fresh_clone(image_project, tmp_path):
    """The fast lane's one whole pipeline under kfp.local: on tag B of a DVC project, with the optional last step
    on. Every step's artifacts (data, models, metrics as Kubeflow shows them, lineage, the ONNX model); then the
    outputs pushed to the project's remote and the .dvc pointers committed to a branch of the project, and a fresh
    clone of that branch `dvc pull`s exactly the bytes the run produced."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from jointdistill.pipelines import pipeline as kfp_pipeline

    from jointdistill.config import load_params, params_from_dict
    from jointdistill.data.contract import verify_prepared
    from jointdistill.models import load_model
    from jointdistill.provenance import lineage

    from .conftest import REPO

    p = load_params(
        REPO / "params.yaml",
        [
            "prepare.dataset=folder",
            "prepare.budget.seg=1.0",
            "prepare.height=48",
            "prepare.width=96",
            "prepare.gallery_images=0",
            "teacher.widths=[16,32,64,96]",
            "teacher.head_channels=32",
            "teacher.epochs=1",
            "teacher.batch_size=4",
            "distill.mode=full",  # the mode whose every record (ω, trajectory) the run must carry
            "distill.epochs=2",
            "distill.batch_size=4",
            "distill.probe_images=3",
            "distill.top_k=4",
            "distill.connector_warmup=4",
            "distill.timeframe_steps=0",
            "distill.grad_log_every=2",
            "distill.teacher_cache=false",
        ],
    )
    url = image_project.as_uri()
    artifacts = kfp_pipeline.run_local_artifacts(
        p,
        tmp_path / "root",
        data_repo=url,
        data_rev="B",
        data_path="data/raw/street",
        results_remote="gs://pinned-images/dvc",
        results_prefix="runs/b1",
        results_git_repo=url,
        results_git_branch="results/b1",
    )
    outputs = {name: a.path for name, a in artifacts.items()}
    classes = ["road", "car", "sky"]
    # The confusion matrix as Kubeflow shows it: class names, rows of pixel counts that sum to the test pixels.
    matrix = artifacts["confusion"].metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == classes
    assert [r["row"] for r in matrix["rows"]] and all(len(r["row"]) == 3 for r in matrix["rows"])
    assert sum(map(sum, (r["row"] for r in matrix["rows"]))) > 0
    ious = artifacts["class_iou"].metadata
    assert set(ious) <= {f"iou/{c}" for c in classes} and ious and all(0 <= v <= 1 for v in ious.values())
    meta = verify_prepared(outputs["prepared"], check_digests=True)
    assert meta["resolution"] == [48, 96] and sum(meta["counts"].values()) == 36 and meta["classes"] == classes
    # prepare ran with prepare.root at the folder the source step fetched (a path of this run); its params digest
    # is still the user's params', as every other stage's is.
    assert meta["params_digest"] == lineage.read(outputs["prepared"])["params_digest"] == p.digest("prepare")
    for task in ("seg", "depth"):
        _, record = load_model(f"{outputs[f'teacher_{task}']}/model.pt")
        assert record["task"] == task
    model, record = load_model(f"{outputs['student']}/student.pt")
    assert record["mode"] == "full" and set(model.config.tasks) == {"seg", "depth"}
    report = json.loads(Path(outputs["student"], "report.json").read_text())
    run_facts = json.loads(Path(outputs["student"], "run.json").read_text())
    # 2 timeframes (one per epoch) × 3 probe images × top-4 points × 2 tasks
    assert run_facts["teacher_forward_images"] > 0 and report["trajectory"]["rows"] == 2 * 3 * 4 * 2
    assert Path(outputs["student"], "weights.csv").read_text().count("\n") == 1 + 2 * 3
    evaluation = json.loads(Path(outputs["evaluation"], "report.json").read_text())
    assert "delta_m" in evaluation["student"]["test"] and Path(outputs["evaluation"], "report.html").exists()
    # Lineage in every output: the pinned data, these params, the code by content, each parent's digest.
    commit_b = run(image_project, "git", "rev-parse", "B")
    stages = {
        "prepared": ("prepare",),
        "teacher_seg": ("teacher", "seg"),
        "teacher_depth": ("teacher", "depth"),
        "student": ("distill",),
        "evaluation": ("evaluate",),
        "onnx_model": ("export",),
    }
    for name, stage in stages.items():
        lin = lineage.read(outputs[name])
        data = lin["data"]
        assert (data["kind"], data["rev"], data["commit"]) == ("dvc", "B", commit_b), name
        assert lin["params_digest"] == p.digest(*stage), name
        # Code named by content, not by git: the same source gives the same record in any checkout.
        assert lin["code"]["version"] and lin["code"]["source"].startswith("sha256:") and "commit" not in lin["code"]
    assert lineage.read(outputs["teacher_seg"])["parents"] == {"prepared": lineage.folder_digest(outputs["prepared"])}
    assert lineage.read(outputs["student"])["parents"] == {
        n: lineage.folder_digest(outputs[n]) for n in ("prepared", "teacher_seg", "teacher_depth")
    }
    assert set(lineage.read(outputs["onnx_model"])["parents"]) == {"prepared", "student"}
    parity = json.loads(Path(outputs["onnx_model"], "parity.json").read_text())
    assert parity["passed"] and Path(outputs["onnx_model"], "MODEL_CARD.md").exists()
    s = ort.InferenceSession(f"{outputs['onnx_model']}/student.onnx", providers=["CPUExecutionProvider"])
    seg, depth = s.run(None, {"image": np.zeros((2, 3, 48, 96), np.float32)})
    assert seg.shape == (2, len(classes), 48, 96) and depth.shape == (2, 1, 48, 96) and (depth > 0).all()

    # The pointers: an artifact of the last step, and a commit on the project's branch.
    pointers = next(Path(tmp_path / "root").rglob("runs/b1/RESULTS.json"))
    record = json.loads(pointers.read_text())
    names = {
        "prepared": "prepared",
        "teacher_seg": "teacher_seg",
        "teacher_depth": "teacher_depth",
        "student": "student",
        "evaluation": "evaluation",
        "export": "onnx_model",
    }
    assert sorted(record["outputs"]) == sorted(names) and record["remote"] == "gs://pinned-images/dvc"
    assert record["outputs"]["student"]["lineage"]["data"]["rev"] == "B"
    assert run(image_project, "git", "log", "-1", "--format=%s", "results/b1") == "jointdistill results: runs/b1"
    ran = params_from_dict(__import__("yaml").safe_load((pointers.parent / "params.yaml").read_text()))
    assert ran.digest("distill") == p.digest("distill") == record["outputs"]["student"]["lineage"]["params_digest"]
    # A laptop: a fresh clone of the project, the results branch, dvc pull.
    fresh = tmp_path / "laptop"
    run(tmp_path, "git", "clone", "-q", "--branch", "results/b1", url, str(fresh))
    dvc(fresh, "pull", "-q", "-R", "runs/b1")
    for pointer_name, output in names.items():
        assert _files(fresh / "runs" / "b1" / pointer_name) == _files(outputs[output]), pointer_name
    assert run(fresh, "git", "status", "--porcelain") == ""  # the pulled data is git-ignored


def test_push_results_errors_leave_nothing_behind(gcs_emulator, tmp_path):
    from jointdistill.cloud import dvc_results
    from jointdistill.errors import ConfigError

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "student.pt").write_bytes(b"weights")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.dvc").write_text("previous")
    cases = [
        (
            {"student": tmp_path / "student"},
            "gs://no-such-bucket-jd/dvc",
            "runs/x",
            DataError,
            "could not push to the DVC remote gs://no-such-bucket-jd/dvc",
        ),
        ({"student": tmp_path / "nothing"}, str(tmp_path / "remote"), "runs/x", DataError, "missing or empty"),
        ({"student": tmp_path / "student"}, "", "runs/x", ConfigError, "give the DVC remote URL"),
        ({"student": tmp_path / "student"}, str(tmp_path / "remote"), "../up", ConfigError, "relative path"),
    ]
    for outputs, remote, prefix, exc, message in cases:
        with pytest.raises(exc, match=re.escape(message)):
            dvc_results.push(outputs, remote, tmp_path / "out", prefix)
        assert _files(tmp_path / "out") == {"old.dvc": b"previous"}
    # The data pushed, but the pointers cannot be committed: the step fails and the old pointers stay.
    with pytest.raises(DataError, match="push-results: git clone"):
        dvc_results.push(
            {"student": tmp_path / "student"},
            str(tmp_path / "remote"),
            tmp_path / "out",
            "runs/x",
            git_repo=(tmp_path / "no-such-repo").as_uri(),
            git_branch="results/x",
        )
    assert _files(tmp_path / "out") == {"old.dvc": b"previous"}
    with pytest.raises(ConfigError, match="needs --git-branch"):
        dvc_results.push(
            {"student": tmp_path / "student"},
            str(tmp_path / "remote"),
            tmp_path / "out",
            "runs/x",
            git_repo="https://example.invalid/repo.git",
        )


def test_push_results_cli_to_a_local_remote(tmp_path):
    """The CLI with a local-folder remote: pointers written, objects in DVC's layout, re-push is a no-op."""
    from typer.testing import CliRunner

    from jointdistill.cli import app

    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.txt").write_text("x\n")
    (tmp_path / "a" / "sub" / "y.txt").write_text("y\n")
    args = [
        "push-results",
        "--remote",
        str(tmp_path / "remote"),
        "--output",
        f"student={tmp_path / 'a'}",
        "--out",
        str(tmp_path / "ptr"),
        "--prefix",
        "runs/r1",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    pointer = __import__("yaml").safe_load((tmp_path / "ptr" / "runs" / "r1" / "student.dvc").read_text())
    md5 = pointer["outs"][0]["md5"]
    assert pointer["outs"][0]["path"] == "student" and pointer["outs"][0]["nfiles"] == 2 and md5.endswith(".dir")
    assert (tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    assert f"student: {md5} (2 files)" in r.output
    assert (tmp_path / "ptr" / "runs" / "r1" / ".gitignore").read_text() == "/student\n"
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and (tmp_path / "ptr" / "runs" / "r1" / "student.dvc").read_text() == (
        (tmp_path / "ptr" / "runs" / "r1" / "student.dvc").read_text()
    )
    bad = CliRunner().invoke(app, [*args[:3], "--output", "no-equals-sign", *args[5:]])
    assert bad.exit_code == 2 and "expected NAME=FOLDER" in bad.output
