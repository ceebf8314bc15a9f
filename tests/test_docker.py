"""The container image: hadolint-clean Dockerfile, and its install step run for real (no Docker engine here)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

BIN = Path(sys.executable).parent


def test_dockerfile_is_hadolint_clean():
    r = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001$", runtime, re.M) and 'ENTRYPOINT ["jointdistill"]' in runtime
    assert "HEALTHCHECK" not in text
    assert "scripts/install.sh /opt/venv" in text and "JOINTDISTILL_INSTALL=package" in text
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and "JOINTDISTILL_ORT_GPU" in text
    # Everything the package build needs passes .dockerignore and is copied.
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    copied = {p.rstrip("/") for line in copied for p in line.split()}
    assert (
        copied
        == allowed
        == {"pyproject.toml", "requirements.lock", "README.md", "scripts", "src", "components", "pipelines"}
    )


def test_install_script_rejects_an_unknown_mode(tmp_path):
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh"), str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        env={**os.environ, "JOINTDISTILL_INSTALL": "docker"},
        timeout=60,
    )
    assert r.returncode == 2 and "expected editable or package" in r.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_image_install_step_builds_a_working_venv(tmp_path):
    """The Dockerfile's RUN step: the locked set plus the project as a package (not editable). Without compiling
    the bytecode, the one part `make setup` already runs on every fresh clone (the image's build compiles it)."""
    venv = tmp_path / "venv"
    env = {**os.environ, "JOINTDISTILL_INSTALL": "package", "UV_COMPILE_BYTECODE": "0"}
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh"), str(venv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        probe = (
            "import jointdistill, jointdistill.pipelines.pipeline as p, jointdistill.components.export; "
            "print(jointdistill.__file__)"
        )
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert str(venv) in out.stdout  # installed into the venv, not pointing back at the checkout
        version = subprocess.run([str(venv / "bin" / "jointdistill"), "--version"], capture_output=True, text=True)
        assert version.stdout.strip() == "0.1.0"
        again = subprocess.run(
            ["bash", str(REPO / "scripts" / "install.sh"), str(venv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert "up to date" in again.stdout  # idempotent, as in `make`
    finally:
        shutil.rmtree(venv, ignore_errors=True)
