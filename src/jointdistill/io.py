"""Atomic outputs: a stage writes into a temporary sibling and renames it into place when done, so a failed
or killed run never leaves a half-written output and never destroys the previous one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from jointdistill.errors import OutputError


class Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...


H = TypeVar("H", bound=Hasher)


_TMP = ".tmp-"
_OLD = ".old-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_writable_dir(parent: Path, what: str) -> None:
    """Fail early, with the path in the message, when ``parent`` cannot hold new files."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{what}: cannot write to {parent} ({exc.strerror or exc})") from None


def recover(out: Path) -> None:
    """Undo what a run killed mid-swap left behind: restore the previous output and drop stale temps."""
    parent = out.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{out.name}{_OLD}*"))
    if olds and not out.exists():
        os.replace(olds[-1], out)
        olds = olds[:-1]
    for stale in [*olds, *parent.glob(f".{out.name}{_TMP}*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``out`` in one rename.

    On an exception the temporary directory is removed and ``out`` is left exactly as it was.
    """
    out = Path(out).absolute()
    ensure_writable_dir(out.parent, f"output {out}")
    recover(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)  # a kill between these two renames is undone by recover()
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    ensure_writable_dir(path.parent, f"output {path}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class NpyStream:
    """Write an ``.npy`` of a known shape one leading-axis row at a time, with plain sequential writes.

    Unlike a writable memmap, the rows written so far are not mapped into the process, so its resident
    memory stays at one row however large the array grows. The file is byte-identical to ``np.save``'s.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype) -> None:
        import numpy as np

        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self._rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close()/__exit__
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def append(self, row) -> None:
        import numpy as np

        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape != self.shape[1:]:
            raise ValueError(f"{self.path.name}: row {row.shape}, expected {self.shape[1:]}")
        if self._rows == self.shape[0]:
            raise ValueError(f"{self.path.name}: more than {self.shape[0]} rows")
        self._file.write(row.tobytes())
        self._rows += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self._rows} of {self.shape[0]} rows written")

    def __enter__(self) -> NpyStream:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def hash_file(path: str | os.PathLike, *hashers: H) -> tuple[H, ...]:
    """Feed a file to every hasher (``hashlib`` objects, or anything with ``update(bytes)``) in one pass of 1 MiB
    chunks, and return them. The one place that reads a file to hash it."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashers:
                h.update(chunk)
    return hashers


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file."""
    (h,) = hash_file(path, hashlib.sha256())
    return h.hexdigest()
