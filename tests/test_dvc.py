"""`dvc repro` for real, in a temporary git repository holding a copy of this project."""

import os
import shutil
import subprocess

import pytest
import yaml

from jointdistill.data.contract import verify_prepared

from .conftest import REPO

pytestmark = pytest.mark.slow

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV}, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def set_params(project, **prepare):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["prepare"].update(prepare)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dst = tmp_path_factory.mktemp("dvcproject")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith(("data/prepared", "dvc.lock")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    set_params(dst, num_samples=30, height=40, width=80, gallery_images=2)
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "project copy"], dst)
    return dst


def test_repro_runs_then_skips_then_reruns_on_param_change(project):
    out = run(["dvc", "repro"], project)
    assert "Running stage 'prepare'" in out
    meta = verify_prepared(project / "data" / "prepared", check_digests=True)
    assert meta["resolution"] == [40, 80] and sum(meta["counts"].values()) == 30
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["prepare"]["height"] == 40
    assert {d["path"] for d in lock["stages"]["prepare"]["deps"]} >= {"src/jointdistill/data",
                                                                       "src/jointdistill/stages/prepare.py"}

    stamp = (project / "data" / "prepared" / "meta.json").stat().st_mtime_ns
    out = run(["dvc", "repro"], project)
    assert "didn't change, skipping" in out and "Running stage" not in out
    assert (project / "data" / "prepared" / "meta.json").stat().st_mtime_ns == stamp
    assert "up to date" in run(["dvc", "status"], project)

    set_params(project, height=32)
    out = run(["dvc", "repro"], project)
    assert "Running stage 'prepare'" in out
    assert verify_prepared(project / "data" / "prepared")["resolution"] == [32, 80]


def test_code_change_reruns(project):
    run(["dvc", "repro"], project)
    with open(project / "src" / "jointdistill" / "stages" / "prepare.py", "a") as fh:
        fh.write("\n# a change to the stage's code\n")
    assert "Running stage 'prepare'" in run(["dvc", "repro"], project)


def test_every_stage_declares_deps_params_outs():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        assert stage.get("deps") and stage.get("outs"), name
        assert stage.get("params"), name
        for dep in stage["deps"]:
            assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"
