"""Published models on Google Cloud Storage: `publish` an export folder as an immutable version, `fetch_model`
it back, every file checked against its checksum on both sides.

Layout: ``gs://BUCKET/PREFIX/VERSION/`` holds the export's files and ``manifest.json`` (name, size, sha256,
md5 and crc32c of every file). The manifest is written last and marks the version as published: a
published version is never overwritten (every upload is conditional on the object not existing), and a
publish that was interrupted can be re-run to complete the same version.

Credentials are google-cloud-storage's: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS or
`gcloud auth application-default login`), or an emulator through STORAGE_EMULATOR_HOST.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from jointdistill.errors import DataError, OutputError
from jointdistill.io import atomic_dir, hash_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "jointdistill.published/1"
REQUIRED = ("student.onnx", "parity.json", "MODEL_CARD.md")
OPTIONAL = ("report.json", "metrics.json", "run.json", "lineage.json", "student.fp16.onnx", "student.int8.onnx")
_URL = re.compile(r"^gs://(?P<bucket>[a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(?P<prefix>.*?))?/?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_url(url: str) -> tuple[str, str]:
    m = _URL.match(url)
    if not m:
        raise DataError(f"{url!r}: expected gs://BUCKET[/PREFIX]")
    return m["bucket"], (m["prefix"] or "").strip("/")


def _client():
    try:
        from google.cloud import storage
    except ImportError:
        raise OutputError("GCS needs google-cloud-storage: pip install 'jointdistill[gcs]'") from None
    try:
        return storage.Client()
    except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise OutputError(
            f"GCS: no usable credentials ({str(exc).splitlines()[0]}); set "
            "GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
        ) from None


def checksums(path: Path) -> dict:
    sha, md5 = hash_file(path, hashlib.sha256(), hashlib.md5())
    return {"size": path.stat().st_size, "sha256": sha.hexdigest(), "md5": base64.b64encode(md5.digest()).decode()}


def _crc32c(path: Path) -> str:
    """GCS's crc32c (Castagnoli), base64 of the big-endian value, as the object metadata reports it."""
    import google_crc32c

    (c,) = hash_file(path, google_crc32c.Checksum())
    return base64.b64encode(c.digest()).decode()


def _describe(path: Path, name: str | None = None) -> dict:
    return {"name": name or path.name, **checksums(path), "crc32c": _crc32c(path)}


def default_version(export_dir: Path) -> str:
    """``<params digest>-<first 8 hex of student.onnx's sha256>``: the same export always gets the same name."""
    try:
        digest = json.loads((export_dir / "report.json").read_text()).get("params_digest") or "model"
    except (OSError, ValueError):
        digest = "model"
    return f"{digest}-{checksums(export_dir / 'student.onnx')['sha256'][:8]}"


def _check_export(export_dir: Path) -> list[Path]:
    missing = [n for n in REQUIRED if not (export_dir / n).is_file()]
    if missing:
        raise DataError(f"{export_dir}: not an export folder (missing {', '.join(missing)}); run `jointdistill export`")
    try:
        parity = json.loads((export_dir / "parity.json").read_text())
    except ValueError as exc:
        raise DataError(f"{export_dir / 'parity.json'}: unreadable ({exc})") from None
    if not parity.get("passed"):
        raise DataError(f"{export_dir}: its parity check did not pass; refusing to publish it")
    return [export_dir / n for n in (*REQUIRED, *OPTIONAL) if (export_dir / n).is_file()]


def _verify_blob(blob, expected: dict, where: str) -> None:
    blob.reload()
    if (
        blob.size != expected["size"]
        or (blob.md5_hash and blob.md5_hash != expected["md5"])
        or (blob.crc32c and blob.crc32c != expected["crc32c"])
    ):
        raise OutputError(
            f"{where}: the stored object does not match the local file (size {blob.size} vs "
            f"{expected['size']}, md5 {blob.md5_hash} vs {expected['md5']}); not published"
        )


def publish(export_dir: str | Path, url: str, version: str | None = None, triton: bool = True) -> dict:
    """Upload an export folder to ``url/VERSION/``; return the manifest (with ``url``).

    With ``triton``, ``VERSION/triton/`` also holds a Triton model repository of the student
    (``student/1/model.onnx``, ``student/config.pbtxt``), for KServe's Triton runtime (deploy.py)."""
    import tempfile

    export_dir = Path(export_dir)
    files = [(p.name, p) for p in _check_export(export_dir)]
    version = version or default_version(export_dir)
    if not _VERSION.match(version):
        raise DataError(f"version {version!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    bucket_name, prefix = parse_url(url)
    base = f"{prefix}/{version}" if prefix else version
    where = f"gs://{bucket_name}/{base}/"
    bucket = _client().bucket(bucket_name)
    with tempfile.TemporaryDirectory(prefix="jointdistill-publish-") as tmp:
        if triton:
            from jointdistill.serving.deploy import TRITON_DIR, triton_layout

            for rel, data in triton_layout(export_dir / "student.onnx").items():
                local = Path(tmp) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
                files.append((f"{TRITON_DIR}/{rel}", local))
        return _upload_version(bucket, bucket_name, base, where, version, files, export_dir)


def _upload_version(
    bucket, bucket_name: str, base: str, where: str, version: str, files: list[tuple[str, Path]], export_dir: Path
) -> dict:
    from google.api_core import exceptions as gexc

    try:
        if bucket.blob(f"{base}/{MANIFEST}").exists():
            raise OutputError(f"{where} is already published; versions are immutable (choose another --version)")
        entries = []
        for name, path in files:
            expected = _describe(path, name)
            blob = bucket.blob(f"{base}/{name}")
            try:
                blob.upload_from_filename(str(path), if_generation_match=0, checksum="crc32c")
            except gexc.PreconditionFailed:
                # Left by an interrupted publish of this version: keep it only if it is the same file.
                blob.reload()
                if blob.md5_hash != expected["md5"]:
                    raise OutputError(f"{where}{name} exists with other content; not overwriting it") from None
            _verify_blob(blob, expected, f"{where}{name}")
            entries.append(expected)
        from jointdistill.provenance.lineage import source_commit

        # The git commit of the publishing code (the export's lineage names its source by content only).
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "files": entries,
            "source": {"export_dir": str(export_dir.resolve()), "commit": source_commit()},
        }
        try:
            bucket.blob(f"{base}/{MANIFEST}").upload_from_string(
                json.dumps(manifest, indent=2) + "\n", content_type="application/json", if_generation_match=0
            )
        except gexc.PreconditionFailed:
            raise OutputError(f"{where} was published by someone else meanwhile; not overwriting it") from None
    except gexc.NotFound as exc:
        raise OutputError(f"gs://{bucket_name}: no such bucket or object ({exc.message})") from None
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{where}: {exc}") from None
    return {**manifest, "url": where}


def fetch_model(url: str, out: str | Path) -> dict:
    """Download a published version (``gs://BUCKET/PREFIX/VERSION``) into ``out`` (replaced atomically), checking
    every file against the manifest; return the manifest."""
    from google.api_core import exceptions as gexc

    bucket_name, base = parse_url(url)
    where = f"gs://{bucket_name}/{base}/"
    bucket = _client().bucket(bucket_name)
    try:
        try:
            manifest = json.loads(bucket.blob(f"{base}/{MANIFEST}").download_as_bytes())
        except gexc.NotFound:
            raise DataError(f"{where}: no {MANIFEST}; not a published jointdistill model (or not finished)") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{where}{MANIFEST}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        with atomic_dir(out) as tmp:
            for entry in manifest["files"]:
                name = entry["name"]
                parts = name.split("/")
                if name.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
                    raise DataError(f"{where}{MANIFEST}: bad file name {name!r}")
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                bucket.blob(f"{base}/{name}").download_to_filename(str(tmp / name))
                got = checksums(tmp / name)
                if got["sha256"] != entry["sha256"] or got["size"] != entry["size"]:
                    raise DataError(
                        f"{where}{name}: checksum mismatch after download (sha256 {got['sha256'][:12]}… "
                        f"vs {entry['sha256'][:12]}…); nothing was written"
                    )
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except gexc.NotFound as exc:
        raise DataError(f"{where}: missing ({exc.message})") from None
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{where}: {exc}") from None
    return manifest


# --- folders on gs:// (the data a Kubeflow Trainer job reads and writes; see trainjob.py) ---


def fetch_model_file(url: str, cache: str | Path | None = None) -> Path:
    """A published ``gs://…/VERSION`` fetched (checksums checked) into ``cache`` (default: a new temporary folder):
    the path of its ``student.onnx``, what `serving.server.serve` loads."""
    import tempfile

    dest = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="jointdistill-serve-")) / "model"
    fetch_model(url, dest)
    return dest / "student.onnx"


def is_url(path: str | Path) -> bool:
    return str(path).startswith("gs://")


def download_tree(url: str, dest: str | Path) -> Path:
    """Copy ``gs://BUCKET/PREFIX`` into ``dest`` (replaced atomically): the one object of that name, or every
    object below the prefix as a folder tree. Each file is checked against the object's md5."""
    from google.api_core import exceptions as gexc

    bucket_name, prefix = parse_url(url)
    bucket = _client().bucket(bucket_name)
    dest = Path(dest)
    try:
        single = bucket.get_blob(prefix) if prefix else None
        if single is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.part")
            _download_checked(single, part, url)
            part.replace(dest)
            return dest
        blobs = [
            b
            for b in bucket.list_blobs(prefix=f"{prefix}/" if prefix else None)
            if not b.name.endswith("/") and b.name.rsplit("/", 1)[-1] != SUCCESS
        ]
        if not blobs:
            raise DataError(f"{url}: no such object or folder")
        with atomic_dir(dest) as tmp:
            for blob in blobs:
                rel = blob.name[len(prefix) + 1 :] if prefix else blob.name
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise DataError(f"{url}: refusing object name {blob.name!r}")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _download_checked(blob, target, f"gs://{bucket_name}/{blob.name}")
    except gexc.NotFound as exc:
        raise DataError(f"{url}: missing ({exc.message})") from None
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{url}: {exc}") from None
    return dest


def _download_checked(blob, target: Path, where: str) -> None:
    blob.download_to_filename(str(target))
    if blob.md5_hash and checksums(target)["md5"] != blob.md5_hash:
        target.unlink()
        raise DataError(f"{where}: md5 mismatch after download; nothing was written")


def exists(url: str) -> bool:
    """Whether the object ``gs://BUCKET/NAME`` exists."""
    from google.api_core import exceptions as gexc

    bucket_name, name = parse_url(url)
    try:
        return _client().bucket(bucket_name).blob(name).exists()
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{url}: {exc}") from None


def upload_file(path: str | Path, url: str) -> None:
    """Upload one file to ``gs://BUCKET/NAME`` (replacing it)."""
    from google.api_core import exceptions as gexc

    bucket_name, name = parse_url(url)
    try:
        _client().bucket(bucket_name).blob(name).upload_from_filename(str(path), checksum="crc32c")
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{url}: {exc}") from None


def upload_tree(src: str | Path, url: str) -> int:
    """Copy the folder ``src`` to ``gs://BUCKET/PREFIX/`` (objects below the prefix that ``src`` lacks are
    removed, so the prefix ends up equal to the folder); ``_SUCCESS`` is written last, so a reader can tell a
    complete upload from an interrupted one. Returns the number of files."""
    from google.api_core import exceptions as gexc

    src = Path(src)
    bucket_name, prefix = parse_url(url)
    if not prefix:
        raise DataError(f"{url}: upload into a prefix (gs://BUCKET/PREFIX), not a whole bucket")
    bucket = _client().bucket(bucket_name)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    try:
        stale = {b.name for b in bucket.list_blobs(prefix=f"{prefix}/")}
        if f"{prefix}/{SUCCESS}" in stale:
            bucket.blob(f"{prefix}/{SUCCESS}").delete()
        for path in files:
            name = f"{prefix}/{path.relative_to(src).as_posix()}"
            blob = bucket.blob(name)
            blob.upload_from_filename(str(path), checksum="crc32c")
            stale.discard(name)
        for name in stale - {f"{prefix}/{SUCCESS}"}:
            bucket.blob(name).delete()
        bucket.blob(f"{prefix}/{SUCCESS}").upload_from_string(b"")
    except gexc.NotFound as exc:
        raise OutputError(f"gs://{bucket_name}: no such bucket ({exc.message})") from None
    except gexc.GoogleAPIError as exc:
        raise OutputError(f"{url}: {exc}") from None
    return len(files)


SUCCESS = "_SUCCESS"
