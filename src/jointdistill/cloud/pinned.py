"""A dataset pinned to a version of a DVC project: fetched with DVC's own API at a git revision and checked,
file by file, against the md5s that the project's ``.dvc`` / ``dvc.lock`` files record at that revision.

    jointdistill fetch-data REPO --rev v1.2 --path data/raw/nyuv2 --out DIR

``REPO`` is a git URL or a local path of a DVC project; the data comes from that project's default remote (GCS
credentials are the environment's). The returned provenance (repo, revision, the commit it resolved to, path,
recorded md5, files, bytes) is what lineage records: it names exactly which data a run trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from jointdistill.errors import DataError, brief
from jointdistill.io import atomic_dir, hash_file


def _md5(path: Path) -> str:
    (h,) = hash_file(path, hashlib.md5())
    return h.hexdigest()


def _unreachable(where: str, exc: Exception) -> DataError:
    cause = exc.__cause__ or exc
    return DataError(
        f"{where}: could not be downloaded from the project's remote ({type(exc).__name__}: "
        f"{brief(exc, 200)}; {type(cause).__name__}: {brief(cause, 200)}); was it `dvc push`ed, and "
        "can this machine reach the remote?"
    )


def _recorded(fs, path: str, where: str) -> tuple[dict, dict[str, str]]:
    """(info of ``path``, {relative file path: recorded md5}) from the project at the filesystem's revision."""
    from dvc.scm import RevError, SCMError

    try:
        info = fs.info(path)
    except RevError as exc:
        raise DataError(f"{where}: unknown revision ({exc})") from None
    except FileNotFoundError:
        raise DataError(f"{where}: no {path!r} in the project at that revision") from None
    except SCMError as exc:  # CloneError and friends: no git repository there
        raise DataError(f"{where}: not a reachable DVC project ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - a directory's listing is itself an object on the remote
        raise _unreachable(where, exc) from None
    dvc_info = info.get("dvc_info") or {}
    if not dvc_info.get("isout"):
        raise DataError(
            f"{where}: {path!r} is not tracked by DVC at that revision (no .dvc file or dvc.lock "
            "output names it); pin a DVC-tracked path"
        )
    hash_name = getattr(getattr(dvc_info.get("entry"), "hash_info", None), "name", "md5")
    if hash_name != "md5":
        raise DataError(
            f"{where}: {path!r} is recorded with {hash_name!r} hashes (a DVC 2 project); "
            "re-add it with DVC 3 (`dvc cache migrate --dvc-files`) so its md5s can be checked"
        )
    if info["type"] == "directory":
        try:
            found = fs.find(path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise _unreachable(where, exc) from None
        files = {
            name[len(path.rstrip("/")) + 1 :]: d.get("md5") for name, d in found.items() if d.get("type") != "directory"
        }
    else:
        files = {Path(path).name: info.get("md5")}
    missing = [name for name, md5 in files.items() if not md5]
    if missing:
        raise DataError(f"{where}: no recorded md5 for {missing[:3]} (not fully tracked by DVC)")
    return info, files


def fetch(repo: str, rev: str, path: str, out: str | Path) -> dict:
    """Download ``path`` of the DVC project ``repo`` at ``rev`` into ``out`` (a folder, replaced atomically)
    and verify every file against the recorded md5; return the provenance. Nothing is written on any error."""
    from dvc.api import DVCFileSystem

    path = path.strip("/")
    where = f"{repo}@{rev}:{path}"
    try:
        fs = DVCFileSystem(repo, rev=rev)
    except Exception as exc:  # noqa: BLE001 - dvc/scmrepo raise many types for an unreachable or non-DVC repo
        raise DataError(f"{repo}: not a reachable DVC project ({type(exc).__name__}: {exc})") from None
    info, files = _recorded(fs, path, where)
    commit = fs.repo.scm.resolve_rev(rev)
    with atomic_dir(out) as tmp:
        target = tmp / Path(path).name if info["type"] != "directory" else tmp / "_fetch"
        try:
            fs.get(path, str(target), recursive=info["type"] == "directory")
        except Exception as exc:  # noqa: BLE001 - remote errors come from dvc, dvc-data, gcsfs, google-auth
            raise _unreachable(where, exc) from None
        if info["type"] == "directory":
            for child in target.iterdir():
                child.rename(tmp / child.name)
            target.rmdir()
        got = {p.relative_to(tmp).as_posix(): p for p in tmp.rglob("*") if p.is_file()}
        if set(got) != set(files):
            extra, lost = sorted(set(got) - set(files)), sorted(set(files) - set(got))
            raise DataError(
                f"{where}: downloaded files differ from the recorded ones (extra {extra[:3]}, missing {lost[:3]})"
            )
        total = 0
        for name, local in got.items():
            md5 = _md5(local)
            if md5 != files[name]:
                raise DataError(
                    f"{where}: checksum mismatch for {name} (md5 {md5}, recorded {files[name]}); "
                    "the remote's copy is corrupt; nothing was written"
                )
            total += local.stat().st_size
    return {
        "repo": repo,
        "rev": rev,
        "commit": commit,
        "path": path,
        "md5": info.get("md5"),
        "type": info["type"],
        "files": len(files),
        "bytes": total,
    }


__all__ = ["fetch"]
