"""gs:// inputs and outputs for the training commands, so that a Kubeflow Trainer job runs the stage command
unchanged on every node (see trainjob.py):

    torchrun --nproc_per_node 8 -m jointdistill train-teacher --task seg \\
        --params gs://B/run/params.yaml --data gs://B/run/prepared --out gs://B/run/teacher-seg

Inputs are downloaded once per node (by local rank 0; the node's other processes wait for it) and checked
against their md5; the output folder is written locally, as always atomically, and uploaded by rank 0 when the
stage has finished. Local paths pass through untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from jointdistill.cloud import storage

STAGE_DIR_ENV = "JOINTDISTILL_STAGE_DIR"


def _root() -> Path:
    return Path(os.environ.get(STAGE_DIR_ENV) or tempfile.gettempdir()) / "jointdistill-stage"


def _launch_token() -> str:
    """The same for every process of one torchrun launch on a node (their parent is torchrun's agent)."""
    return str(os.getppid()) if "LOCAL_RANK" in os.environ else str(os.getpid())


class Staging:
    """Resolves the command's path arguments; ``close()`` uploads the output and removes the local copies."""

    def __init__(self, wait_seconds: float = 3600):
        self.wait_seconds = wait_seconds
        self.token = _launch_token()
        self._made: list[Path] = []
        self._upload: tuple[Path, str] | None = None

    def _slot(self, url: str) -> Path:
        key = hashlib.sha256(f"{url}\0{self.token}".encode()).hexdigest()[:16]
        name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
        return _root() / key / name

    def input(self, spec: str | Path) -> Path:
        if not storage.is_url(spec):
            return Path(spec)
        url = str(spec)
        dest = self._slot(url)
        ready = dest.with_name(dest.name + ".ready")
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            storage.download_tree(url, dest)
            ready.write_text(self.token)
            self._made.append(dest.parent)
            return dest
        deadline = time.monotonic() + self.wait_seconds
        while not (ready.is_file() and ready.read_text() == self.token):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: local rank 0 did not download it within {self.wait_seconds:.0f} s")
            time.sleep(0.5)
        return dest

    def output(self, spec: str | Path) -> Path:
        if not storage.is_url(spec):
            return Path(spec)
        local = self._slot(str(spec))
        self._made.append(local.parent)
        self._upload = (local, str(spec))
        return local

    def close(self, ok: bool) -> None:
        try:
            if ok and self._upload and int(os.environ.get("RANK", "0")) == 0:
                local, url = self._upload
                storage.upload_tree(local, url)
        finally:
            # With several processes on the node the others may still read the inputs: they stay in the node's
            # scratch space, which goes with the pod.
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
                for path in self._made:
                    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging() -> Iterator[Staging]:
    s = Staging()
    ok = False
    try:
        yield s
        ok = True
    finally:
        s.close(ok)
