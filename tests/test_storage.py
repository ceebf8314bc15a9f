"""Publishing exports to GCS and fetching them back, against a real emulator process (fake-gcs-server)."""

import json

import pytest
from google.api_core.exceptions import PreconditionFailed
from typer.testing import CliRunner

from jointdistill.cli import app
from jointdistill.cloud.storage import MANIFEST, fetch_model, parse_url, publish
from jointdistill.errors import DataError, OutputError

from .conftest import make_bucket


@pytest.fixture
def export_dir(tmp_path):
    """An export folder whose student.onnx is not a model: publish checks files, not graphs (no Triton layout)."""
    d = tmp_path / "export"
    d.mkdir()
    (d / "student.onnx").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than one upload chunk of crc
    (d / "parity.json").write_text(json.dumps({"passed": True}))
    (d / "MODEL_CARD.md").write_text("# card\n")
    (d / "report.json").write_text(json.dumps({"params_digest": "0123456789abcdef"}))
    return d


@pytest.fixture
def bucket(gcs_emulator, request):
    return make_bucket(f"models-{request.node.name.replace('_', '-')[:40].lower()}")


def test_parse_url():
    assert parse_url("gs://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_url("gs://my-bucket") == ("my-bucket", "")
    for bad in ("s3://b/x", "gs://", "my-bucket/x", "gs://UPPER/x"):
        with pytest.raises(DataError, match="expected gs://"):
            parse_url(bad)


def test_the_emulator_enforces_generation_preconditions(bucket):
    """Without this, the never-overwrite test below would prove nothing."""
    blob = bucket.blob("probe")
    blob.upload_from_string(b"one", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("probe").upload_from_string(b"two", if_generation_match=0)
    assert bucket.blob("probe").download_as_bytes() == b"one"


def test_publish_then_fetch_round_trip(export_dir, bucket, tmp_path):
    r = CliRunner().invoke(app, ["publish", f"gs://{bucket.name}/student", "--export", str(export_dir), "--no-triton"])
    assert r.exit_code == 0, r.output
    version = (
        "0123456789abcdef-" + __import__("hashlib").sha256((export_dir / "student.onnx").read_bytes()).hexdigest()[:8]
    )
    assert f"published 4 files → gs://{bucket.name}/student/{version}/" in r.output
    names = sorted(b.name for b in bucket.list_blobs(prefix=f"student/{version}/"))
    assert names == sorted(
        f"student/{version}/{n}" for n in ("student.onnx", "parity.json", "MODEL_CARD.md", "report.json", MANIFEST)
    )
    out = tmp_path / "fetched"
    r = CliRunner().invoke(app, ["fetch-model", f"gs://{bucket.name}/student/{version}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("student.onnx", "parity.json", "MODEL_CARD.md", "report.json"):
        assert (out / name).read_bytes() == (export_dir / name).read_bytes()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == version and len(manifest["files"]) == 4


def test_a_published_version_is_never_overwritten(export_dir, bucket):
    publish(export_dir, f"gs://{bucket.name}/m", "v1", triton=False)
    blobs = {b.name: b.generation for b in bucket.list_blobs(prefix="m/v1/")}
    (export_dir / "student.onnx").write_bytes(b"another model")
    with pytest.raises(OutputError, match="already published; versions are immutable"):
        publish(export_dir, f"gs://{bucket.name}/m", "v1", triton=False)
    assert {b.name: b.generation for b in bucket.list_blobs(prefix="m/v1/")} == blobs
    assert bucket.blob("m/v1/student.onnx").download_as_bytes() != b"another model"
    publish(export_dir, f"gs://{bucket.name}/m", "v2", triton=False)  # a new version is fine


def test_an_interrupted_publish_is_completed_but_never_with_other_content(export_dir, bucket):
    # What a publish killed after its first upload leaves: one object, no manifest.
    bucket.blob("m/v1/student.onnx").upload_from_filename(str(export_dir / "student.onnx"))
    manifest = publish(export_dir, f"gs://{bucket.name}/m", "v1", triton=False)
    assert len(manifest["files"]) == 4 and bucket.blob(f"m/v1/{MANIFEST}").exists()
    bucket.blob("m/v2/student.onnx").upload_from_string(b"a different file")
    with pytest.raises(OutputError, match="exists with other content; not overwriting it"):
        publish(export_dir, f"gs://{bucket.name}/m", "v2", triton=False)
    assert bucket.blob("m/v2/student.onnx").download_as_bytes() == b"a different file"
    assert not bucket.blob(f"m/v2/{MANIFEST}").exists()


def test_fetch_checks_every_file_and_keeps_the_previous_copy(export_dir, bucket, tmp_path):
    publish(export_dir, f"gs://{bucket.name}/m", "v1", triton=False)
    out = tmp_path / "model"
    fetch_model(f"gs://{bucket.name}/m/v1", out)
    before = (out / "student.onnx").read_bytes()
    bucket.blob("m/v1/student.onnx").upload_from_string(b"tampered")  # behind the manifest's back
    with pytest.raises(DataError, match="student.onnx: checksum mismatch after download"):
        fetch_model(f"gs://{bucket.name}/m/v1", out)
    assert (out / "student.onnx").read_bytes() == before
    with pytest.raises(DataError, match="no manifest.json; not a published jointdistill model"):
        fetch_model(f"gs://{bucket.name}/m/nothing-here", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_publish_refuses_an_export_that_failed_or_is_incomplete(export_dir, bucket):
    (export_dir / "parity.json").write_text(json.dumps({"passed": False}))
    with pytest.raises(DataError, match="parity check did not pass"):
        publish(export_dir, f"gs://{bucket.name}/m", triton=False)
    (export_dir / "MODEL_CARD.md").unlink()
    r = CliRunner().invoke(app, ["publish", f"gs://{bucket.name}/m", "--export", str(export_dir)])
    assert r.exit_code == 2 and "not an export folder (missing MODEL_CARD.md)" in r.output
    with pytest.raises(DataError, match="version 'a/b'"):
        (export_dir / "MODEL_CARD.md").write_text("x")
        (export_dir / "parity.json").write_text(json.dumps({"passed": True}))
        publish(export_dir, f"gs://{bucket.name}/m", "a/b", triton=False)
    assert not list(bucket.list_blobs())
