"""Lineage: every stage output says what data, which params and which code made it.

Each stage writes ``lineage.json`` into its output folder (under `dvc repro`, the CLI and KFP alike), and the
KFP components copy it into their output artifacts' metadata (``lineage``)::

    {"format": "jointdistill.provenance.lineage/1", "stage": "distill",
     "data": {"kind": "dvc", "repo": …, "rev": "v1", "commit": "…", "path": "data/raw", "md5": "….dir"},
     "params_digest": "…",
     "code": {"package": "jointdistill", "version": "0.1.0", "module": "jointdistill.stages.distill",
              "source": "sha256:…"},
     "parents": {"prepared": "sha256:…", "teacher_seg": "sha256:…", …}}

``data`` is set by ``prepare`` (a DVC-pinned fetch, a DVC-tracked local folder, an untracked folder, or the
embedded synthetic generator) and inherited by every later stage from its parents. A parent's digest is the
sha256 over its files' relative paths and sha256s (its own lineage.json excluded), so it names the content,
wherever the folder lives. ``code`` names the stage's source by content (`codeid`: the syntax trees of its
import closure, so a comment or a reformatting does not count), never by git commit: the file sits inside the
stage's DVC output, and a commit (often ``-dirty`` mid-repro) would make the same data hash differently in every
checkout. Nothing in the record depends on git, paths, the machine or time: the same inputs give the same file.
The git commit, where one is known (`source_commit`), goes where a run is published instead: the Kubeflow
artifacts' metadata, `publish` and `push-results`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from jointdistill.io import file_sha256, write_json
from jointdistill.provenance import codeid

LINEAGE = "lineage.json"
FORMAT = "jointdistill.provenance.lineage/2"
SYNTHETIC = {"kind": "synthetic"}


def source_commit() -> str | None:
    """The code's git commit: $JOINTDISTILL_SOURCE_COMMIT (set by the image build), else the checkout's HEAD
    (with ``-dirty`` when tracked files differ from it), else None."""
    if os.environ.get("JOINTDISTILL_SOURCE_COMMIT"):
        return os.environ["JOINTDISTILL_SOURCE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def code(module: str = "jointdistill.stages") -> dict:
    """What code made an output: package, version and the content digest of ``module``'s import closure."""
    return codeid.code(module)


def folder_digest(folder: str | Path) -> str:
    """``sha256:`` over the sorted (relative path, file sha256) pairs of a folder, its lineage.json excluded."""
    folder = Path(folder)
    outer = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != LINEAGE):
        outer.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return "sha256:" + outer.hexdigest()


def read(folder: str | Path) -> dict | None:
    path = Path(folder) / LINEAGE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def local_data(root: str | Path | None) -> dict:
    """The data record for a local source folder: DVC-tracked (its md5) or not. The project's git commit is left
    out: the md5 names the data, and the commit changes with every unrelated commit."""
    if root is None:
        return dict(SYNTHETIC)
    root = Path(root).resolve()
    project = next((d for d in (root, *root.parents) if (d / ".dvc").is_dir()), None)
    if project is not None:
        try:
            from dvc.api import DVCFileSystem

            rel = root.relative_to(project).as_posix()
            dvc_info = DVCFileSystem(str(project)).info(rel).get("dvc_info") or {}
            if dvc_info.get("isout") and dvc_info.get("md5"):
                return {"kind": "dvc", "repo": None, "rev": None, "commit": None, "path": rel, "md5": dvc_info["md5"]}
        except Exception:  # noqa: BLE001 - lineage must never fail a stage: an unreadable project is "untracked"
            pass
    return {"kind": "untracked", "path": root.name}


def record(
    stage: str,
    params_digest: str,
    parents: Mapping[str, str | Path] | None = None,
    data: dict | None = None,
    module: str = "jointdistill.stages",
) -> dict:
    """The lineage of a stage's output, made by ``module``'s code with the params of digest ``params_digest`` (the
    stage's own sections: `Params.digest`). ``data`` defaults to what the parents recorded (the first that has
    one)."""
    parents = parents or {}
    if data is None:
        data = next((lin["data"] for p in parents.values() if (lin := read(p)) and lin.get("data")), None)
    return {
        "format": FORMAT,
        "stage": stage,
        "data": data,
        "params_digest": params_digest,
        "code": code(module),
        "parents": {name: folder_digest(path) for name, path in parents.items()},
    }


def write(folder: str | Path, lineage: dict) -> None:
    write_json(Path(folder) / LINEAGE, lineage)


__all__ = ["LINEAGE", "FORMAT", "record", "write", "read", "folder_digest", "local_data", "source_commit", "code"]
