"""A pipeline run's outputs, back into DVC: pushed to a DVC remote with DVC's own API, and described by
``.dvc`` pointer files that any clone of a project using that remote can ``dvc pull`` (or ``dvc import``
from a git branch holding them).

    jointdistill push-results --remote gs://bucket/dvc --out pointers --prefix runs/RUN \\
        --output prepared=DIR --output student=DIR …  [--git-repo URL --git-branch results/RUN]

Layout written to ``out`` (and, with ``git_repo``, committed to ``git_branch`` of that repository):

    PREFIX/<name>.dvc     one pointer per output (md5 of the folder, size, file count)
    PREFIX/.gitignore     the data folders themselves stay out of git
    PREFIX/RESULTS.json   the remote, every output's md5 and its lineage.json (what data, params and code)
    PREFIX/params.yaml    the run's params (when given), to re-run it with `dvc repro`

Objects go to the remote in DVC 3's layout (``files/md5/…``), exactly where ``dvc push`` of the same folders
would put them, so a laptop's ``dvc pull PREFIX`` gets the cluster's bytes. Credentials: the environment's
(for ``gs://``: GOOGLE_APPLICATION_CREDENTIALS or the pod's workload identity); none in code or params.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from jointdistill.errors import ConfigError, DataError, brief
from jointdistill.io import atomic_dir

FORMAT = "jointdistill.results/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "jointdistill",
    "GIT_AUTHOR_EMAIL": "jointdistill@localhost",
    "GIT_COMMITTER_NAME": "jointdistill",
    "GIT_COMMITTER_EMAIL": "jointdistill@localhost",
}


def _check(outputs: dict[str, str | Path], remote: str, prefix: str) -> dict[str, Path]:
    if not remote:
        raise ConfigError(
            "push-results: give the DVC remote URL (e.g. gs://bucket/dvc), the one your project's `dvc remote` uses"
        )
    if not _PREFIX.match(prefix) or ".." in prefix.split("/"):
        raise ConfigError(f"push-results: prefix {prefix!r} must be a relative path like runs/my-run")
    if not outputs:
        raise ConfigError("push-results: no outputs to push")
    folders = {}
    for name, folder in outputs.items():
        if not _NAME.match(name):
            raise ConfigError(f"push-results: output name {name!r}: letters, digits, '_', '-', '.' only")
        folder = Path(folder)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise DataError(f"push-results: output {name!r}: {folder} is missing or empty")
        folders[name] = folder
    return folders


def _git(cwd: Path, *args: str) -> str:
    env = {**_GIT_ENV, **os.environ, "GIT_TERMINAL_PROMPT": "0"}
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or ["(no output)"])[-1]
        raise DataError(f"push-results: git {' '.join(args[:2])}: {last}")
    return r.stdout.strip()


@contextlib.contextmanager
def _quiet_dvc():
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _push(folders: dict[str, Path], remote: str, prefix: str, work: Path) -> dict[str, dict]:
    """`dvc add` + `dvc push` of the folders in a throw-away DVC project; returns each output's .dvc entry."""
    import yaml
    from dvc.repo import Repo

    project = work / "project"
    Repo.init(str(project), no_scm=True)
    repo = Repo(str(project))
    with repo.config.edit() as conf:
        conf["remote"]["results"] = {"url": remote}
        conf["core"]["remote"] = "results"
    repo.close()
    repo = Repo(str(project))
    try:
        targets = []
        for name, folder in folders.items():
            dest = project / prefix / name
            shutil.copytree(folder, dest)
            targets.append(str(dest))
        repo.add(targets)
        try:
            repo.push(remote="results")
            missing = repo.status(cloud=True, remote="results")
        except Exception as exc:  # noqa: BLE001 - DVC's errors for a bad remote are many; one message for all
            cause = exc.__cause__ or exc
            raise DataError(
                f"push-results: could not push to the DVC remote {remote} ({type(exc).__name__}: "
                f"{brief(exc, 200)}; {type(cause).__name__}: {brief(cause, 200)}); is it reachable, "
                "and do this environment's credentials allow writing to it?"
            ) from None
        if missing:
            raise DataError(f"push-results: after the push, the remote {remote} still lacks {sorted(missing)}")
        entries = {}
        for name in folders:
            text = (project / prefix / f"{name}.dvc").read_text()
            entries[name] = {"pointer": text, **yaml.safe_load(text)["outs"][0]}
        return entries
    finally:
        repo.close()


def _commit(git_repo: str, branch: str, prefix: str, pointers: Path, message: str, work: Path) -> str:
    """Commit ``pointers`` (the PREFIX folder) onto ``branch`` of ``git_repo`` (made from its default branch if
    new) and push it; returns the commit."""
    clone = work / "git"
    _git(work, "clone", "-q", git_repo, str(clone))
    if _git(clone, "ls-remote", "--heads", "origin", branch):
        _git(clone, "checkout", "-q", branch)
    else:
        _git(clone, "checkout", "-q", "-b", branch)
    dest = clone / prefix
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(pointers, dest)
    _git(clone, "add", "-A", prefix)
    if _git(clone, "status", "--porcelain", "--", prefix):
        _git(clone, "commit", "-q", "-m", message)
    _git(clone, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    return _git(clone, "rev-parse", "HEAD")


def push(
    outputs: dict[str, str | Path],
    remote: str,
    out: str | Path,
    prefix: str,
    git_repo: str = "",
    git_branch: str = "",
    message: str = "",
    params: dict | None = None,
) -> dict:
    """Push ``outputs`` {name: folder} into the DVC remote ``remote``; write the pointers into ``out``
    (atomically) and, with ``git_repo``, commit them to ``git_branch``. ``params``: the run's params, written
    as ``params.yaml`` beside the pointers. Returns RESULTS.json's content."""
    import yaml

    from jointdistill.provenance import lineage

    folders = _check(outputs, remote, prefix)
    if git_repo and not git_branch:
        raise ConfigError("push-results: --git-repo needs --git-branch (the branch the pointers are committed to)")
    with tempfile.TemporaryDirectory(prefix="jointdistill-results-") as tmp:
        with _quiet_dvc():  # DVC greets a new project and reports each step on its logger
            entries = _push(folders, remote, prefix, Path(tmp))
        # The outputs' lineage names their code by content; the commit of the code that pushed them goes here.
        record: dict[str, Any] = {
            "format": FORMAT,
            "remote": remote,
            "prefix": prefix,
            "source_commit": lineage.source_commit(),
            "outputs": {
                name: {
                    "md5": e["md5"],
                    "size": e.get("size"),
                    "nfiles": e.get("nfiles"),
                    "lineage": lineage.read(folders[name]),
                }
                for name, e in entries.items()
            },
        }
        out = Path(out)
        with atomic_dir(out) as staging:
            folder = staging / prefix
            folder.mkdir(parents=True)
            for name, e in entries.items():
                (folder / f"{name}.dvc").write_text(e["pointer"])
            (folder / ".gitignore").write_text("".join(f"/{name}\n" for name in entries))
            if params is not None:
                (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            (folder / "RESULTS.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if git_repo:  # before the folder replaces ``out``: a failed commit leaves the previous pointers
                record["git"] = {
                    "repo": git_repo,
                    "branch": git_branch,
                    "commit": _commit(
                        git_repo, git_branch, prefix, folder, message or f"jointdistill results: {prefix}", Path(tmp)
                    ),
                }
    return record
