import os
import sys
from pathlib import Path

import pytest

from jointdistill.config import load_params

REPO = Path(__file__).resolve().parents[1]
# Tools the tests spawn (dvc stage commands, the CLI) come from the same environment as pytest.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ["DVC_NO_ANALYTICS"] = "1"

TINY = ["prepare.num_samples=40", "prepare.height=48", "prepare.width=96", "prepare.gallery_images=2"]


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


@pytest.fixture(scope="session")
def tiny_teachers(prepared, tmp_path_factory):
    """Both tiny teachers (2 epochs), trained once per session by the real stage: (seg dir, depth dir)."""
    from jointdistill.stages import teacher

    root = tmp_path_factory.mktemp("tiny-teachers")
    p = load_params(REPO / "params.yaml", [*TINY, *TEACHERS])
    for task in ("seg", "depth"):
        teacher.run(p, task, prepared, root / task)
    return root / "seg", root / "depth"
