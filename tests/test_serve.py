"""`jointdistill serve`: the real KServe model server as a process on 127.0.0.1 (torch blocked in it), spoken to
over HTTP with the Open Inference Protocol v2; bad requests; refusing a file that is not a student; the
InferenceService manifests and the Triton repository that `publish` lays out."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from jointdistill.cli import app
from jointdistill.errors import ConfigError
from jointdistill.serving import client, deploy
from jointdistill.serving import server as serve
from jointdistill.serving.infer import StudentSession

from .conftest import NO_TORCH, make_bucket

NO_TORCH_SERVE = (
    NO_TORCH
    + """
from jointdistill.cli import app
app(prog_name='jointdistill')
"""
)
LIMIT_MB = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *extra, timeout: float = 90.0):
    """`jointdistill serve MODEL` as a process (torch blocked), on a free port; returns (process, base URL)."""
    import tempfile

    port = _free_port()
    # A file, not a pipe: nobody reads a pipe while tests run, and a full one would block the server's logging.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH_SERVE, "serve", str(model), "--port", str(port), "--threads", "1", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"server did not start: {log.read().decode()[-3000:]}")
        time.sleep(0.2)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.seek(0)
    proc.text = proc.log.read().decode(errors="replace")  # what the server logged, for the tests that read it
    proc.log.close()


def _read_log(proc) -> str:
    return proc.text


@pytest.fixture(scope="module")
def model(tiny_export):
    root, _ = tiny_export
    return root / "export" / "student.onnx"


@pytest.fixture(scope="module")
def server(model):
    proc, url = start_server(model, "--name", "student", "--max-payload-mb", str(LIMIT_MB))
    try:
        yield url
    finally:
        stop_server(proc)


def post(url: str, body: bytes, headers: dict) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"{url}/v2/models/student/infer", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def infer(url: str, **kw) -> dict[str, np.ndarray]:
    status, body, headers = post(url, *client.encode_request(**kw))
    assert status == 200, body[:500]
    return client.decode_response(body, headers)


def _batch(session: StudentSession, n: int, seed: int = 0) -> np.ndarray:
    h, w = session.input_size
    rgb = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return np.stack([session.preprocess(im) for im in rgb])


def _png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _same(out: dict, seg_ids: np.ndarray, depth: np.ndarray) -> None:
    assert out["segmentation"].dtype == np.int32 and out["depth"].dtype == np.float32
    assert out["segmentation"].shape == seg_ids.shape == depth.shape == out["depth"].shape
    assert np.array_equal(out["segmentation"], seg_ids)
    assert (np.abs(out["depth"] - depth) / np.abs(depth)).max() <= 1e-5


# ----------------------------------------------------------------------------- the real server over HTTP
def test_health_and_metadata(server, model):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/student/ready"):
        with urllib.request.urlopen(server + path) as r:
            assert r.status == 200
    with urllib.request.urlopen(f"{server}/v2/models/student") as r:
        meta = json.loads(r.read())
    session = StudentSession(model, "cpu")
    assert meta["name"] == "student" and meta["platform"] == "onnxruntime"
    assert meta["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
    ]
    assert meta["outputs"] == [
        {"name": "segmentation", "datatype": "INT32", "shape": [-1, -1, -1]},
        {"name": "depth", "datatype": "FP32", "shape": [-1, -1, -1]},
    ]
    p = meta["parameters"]
    assert p["classes"] == session.classes and p["palette"] == session.meta["palette"]
    assert p["depth_unit"] == "m" and p["input_size"] == list(session.input_size)
    assert p["size_multiple"] == session.meta["size_multiple"] == 8
    assert "multiples of 8" in p["input_size_rule"] and p["mean"] == session.meta["mean"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server}/v2/models/other")
    assert err.value.code == 404


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("binary", [False, True])
def test_tensor_input_matches_onnxruntime(server, model, n, binary):
    session = StudentSession(model, "cpu")
    x = _batch(session, n, seed=n)
    seg, depth = session.run(x)
    out = infer(server, tensor=x, binary=binary, request_id=f"req-{n}")
    _same(out, seg.argmax(axis=1).astype(np.int32), depth[:, 0])


def test_tensor_input_at_another_size_the_model_takes(server, model):
    session = StudentSession(model, "cpu")
    x = np.random.default_rng(5).normal(size=(2, 3, 32, 64)).astype(np.float32)  # multiples of 8, not 48×96
    seg, depth = session.run(x)
    _same(infer(server, tensor=x, binary=True), seg.argmax(axis=1).astype(np.int32), depth[:, 0])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("binary", [False, True])
def test_encoded_images_come_back_at_their_own_size(server, model, n, binary):
    session = StudentSession(model, "cpu")
    rng = np.random.default_rng(10 + n)
    rgb = [rng.integers(0, 256, (70, 150, 3), dtype=np.uint8) for _ in range(n)]
    files = [_png(im) if i % 2 == 0 else _png(im, "JPEG") for i, im in enumerate(rgb)]
    decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]  # what the server sees
    ref = session.predict(decoded)
    out = infer(server, images=files, binary=binary)
    assert out["segmentation"].shape == (n, 70, 150)
    _same(out, np.stack([lb for lb, _ in ref]).astype(np.int32), np.stack([d for _, d in ref]))


def _bad(server, inputs: list[dict], raw: bytes | None = None) -> tuple[int, str]:
    body = raw if raw is not None else json.dumps({"inputs": inputs}).encode()
    status, text, _ = post(server, body, {"Content-Type": "application/json"})
    return status, json.loads(text)["error"] if text.startswith(b"{") else text.decode()


def _tensor_input(shape, datatype="FP32", name="image", data=None):
    size = int(np.prod(shape)) if shape else 0
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(shape),
        "data": data if data is not None else [0.0] * size,
    }


BAD = {
    "wrong dtype": (
        [_tensor_input([1, 3, 48, 96], "INT64", data=[0] * (3 * 48 * 96))],
        "datatype INT64, expected FP32",
    ),
    "wrong rank": ([_tensor_input([3, 48, 96])], "rank 3, expected 4"),
    "channels": ([_tensor_input([1, 4, 48, 96])], "4 channels, expected 3"),
    "size the model cannot take": ([_tensor_input([1, 3, 50, 100])], "H×W 50×100 not accepted"),
    "empty tensor batch": ([_tensor_input([0, 3, 48, 96])], "empty batch"),
    "data does not fit the shape": ([_tensor_input([1, 3, 48, 96], data=[0.0] * 10)], "does not match shape"),
    "NaN": ([_tensor_input([1, 3, 8, 8], data=[float("nan")] + [0.0] * 191)], "NaN"),
    "undecodable bytes": (
        [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()],
            }
        ],
        "[0]: not a decodable image",
    ),
    "not base64": ([{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}], "not base64"),
    "empty image batch": ([{"name": "image_bytes", "datatype": "BYTES", "shape": [0], "data": []}], "empty batch"),
    "unknown input name": ([_tensor_input([1, 3, 48, 96], name="pixels")], "unknown input 'pixels'"),
    "two inputs": (
        [_tensor_input([1, 3, 48, 96]), {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
        "exactly one input",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_gets_400_and_the_server_keeps_serving(server, model, case):
    inputs, expected = BAD[case]
    status, message = _bad(server, inputs)
    assert status == 400 and expected in message, (status, message)
    # ... and a good request right after it still succeeds.
    session = StudentSession(model, "cpu")
    x = _batch(session, 1, seed=99)
    seg, _ = session.run(x)
    assert np.array_equal(infer(server, tensor=x, binary=True)["segmentation"], seg.argmax(axis=1))


def test_bad_binary_requests(server, model):
    session = StudentSession(model, "cpu")
    good, headers = client.encode_request(tensor=_batch(session, 1), binary=True)
    json_length = int(headers[client.HEADER_LENGTH])
    cases = {
        "the tensor is cut short": (good[:-100], headers, "runs past the body"),
        "the shape does not match the data": (
            good.replace(b"[1, 3, 48, 96]", b"[1, 3, 48, 88]", 1),
            headers,
            "data does not match shape",
        ),
        "the header length is past the body": (
            good,
            {**headers, client.HEADER_LENGTH: str(len(good) + 1)},
            "does not fit a body",
        ),
        "the header is not JSON": (b"x" * json_length + good[json_length:], headers, "is not JSON"),
        "binary_data_size runs past the body": (
            good.replace(b'"binary_data_size": ', b'"binary_data_size": 9'),
            {**headers, client.HEADER_LENGTH: str(json_length + 1)},
            "runs past the body",
        ),
    }
    for case, (body, hdrs, expected) in cases.items():
        status, text, _ = post(server, body, hdrs)
        assert status == 400 and expected in json.loads(text)["error"], (case, status, text[:300])
        infer(server, tensor=_batch(session, 1), binary=True)


def test_images_of_different_sizes_in_one_request(server):
    files = [_png(np.zeros((40, 60, 3), np.uint8)), _png(np.zeros((50, 60, 3), np.uint8))]
    status, text, _ = post(server, *client.encode_request(images=files))
    assert status == 400 and b"different sizes" in text
    infer(server, images=files[:1])


# ----------------------------------------------------------------------------- the standard client
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_in_both_modes_with_compression(server, model, binary, compression):
    """tritonclient.http, as users call any Open Inference Protocol server: binary or JSON tensors (JSON without a
    Content-Type header), optionally gzip/deflate-compressed; outputs equal onnxruntime's."""
    import tritonclient.http as triton

    session = StudentSession(model, "cpu")
    x = _batch(session, 2, seed=7)
    seg, depth = session.run(x)
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("student", [inp], request_compression_algorithm=compression)
    _same({n: result.as_numpy(n) for n in ("segmentation", "depth")}, seg.argmax(axis=1).astype(np.int32), depth[:, 0])
    client.close()


def test_tritonclient_output_selection(server, model):
    """Only the outputs asked for come back, each binary or JSON as asked."""
    import tritonclient.http as triton

    session = StudentSession(model, "cpu")
    x = _batch(session, 1, seed=3)
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)

    def got(outputs):
        r = client.infer("student", [inp], outputs=outputs)
        return {o["name"]: "binary_data_size" in (o.get("parameters") or {}) for o in r.get_response()["outputs"]}

    assert got([triton.InferRequestedOutput("depth", binary_data=True)]) == {"depth": True}
    assert got([triton.InferRequestedOutput("depth", binary_data=False)]) == {"depth": False}
    assert got(
        [
            triton.InferRequestedOutput("segmentation", binary_data=False),
            triton.InferRequestedOutput("depth", binary_data=True),
        ]
    ) == {"segmentation": False, "depth": True}
    assert got(None) == {"segmentation": True, "depth": True}  # tritonclient asks for binary_data_output
    with pytest.raises(triton.InferenceServerException, match="unknown output 'logits'"):
        got([triton.InferRequestedOutput("logits")])
    client.close()


def test_unknown_model_and_bad_encoding_get_one_log_line_each(model):
    """An unknown model is a 404 without a traceback; every request is one line in the server's log."""
    proc, url = start_server(model, "--name", "student")
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/nope/infer", data=b"{}"))
        assert err.value.code == 404
        body, headers = client.encode_request(tensor=np.zeros((1, 3, 48, 96), np.float32))
        status, text, _ = post(url, body, {**headers, "Content-Encoding": "br"})
        assert status == 400 and "Content-Encoding 'br' is not supported" in json.loads(text)["error"]
        status, text, _ = post(url, b"not gzip at all", {**headers, "Content-Encoding": "gzip"})
        assert status == 400 and "not valid gzip data" in json.loads(text)["error"]
        infer(url, tensor=np.zeros((1, 3, 48, 96), np.float32))
    finally:
        stop_server(proc)
    log = _read_log(proc)
    lines = [ln for ln in log.splitlines() if "/v2/models/" in ln]
    assert len(lines) == 4, log
    assert "Traceback" not in log and "kserve.trace" not in log
    assert "404" in lines[0] and "Model with name nope does not exist" in lines[0]
    assert " 200 " in lines[-1]


def test_a_payload_over_the_limit_gets_400(server, model):
    big = np.zeros((3, 3, 256, 512), np.float32)  # 4.7 MB > 1 MB
    for binary in (True, False):
        status, text, _ = post(server, *client.encode_request(tensor=big, binary=binary))
        assert status == 400 and b"over the server's limit" in text, text[:300]
    session = StudentSession(model, "cpu")
    infer(server, tensor=_batch(session, 1), binary=True)


def test_a_chunked_payload_over_the_limit_gets_400(server, model):
    """No Content-Length: the server counts what arrives and stops at the limit."""
    import http.client

    body, headers = client.encode_request(tensor=np.zeros((3, 3, 256, 512), np.float32), binary=True)
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    conn.request("POST", "/v2/models/student/infer", body=chunks, headers=headers, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 400 and b"over the server's limit" in r.read()
    conn.close()
    infer(server, tensor=_batch(StudentSession(model, "cpu"), 1), binary=True)


def test_an_image_over_the_pixel_limit_gets_400(server, model):
    huge = _png(np.zeros((5001, 8000), np.uint8))  # 40 M pixels, a few kB as PNG
    status, text, _ = post(server, *client.encode_request(images=[huge], binary=True))
    assert status == 400 and "8000×5001 pixels is over the limit" in json.loads(text)["error"]
    infer(server, images=[_png(np.zeros((48, 96, 3), np.uint8))])


def test_malformed_json_gets_400(server, model):
    status, message = _bad(server, [], raw=b'{"inputs": [')
    assert status == 400 and message.startswith("malformed inference request") and "JSON" in message
    status, message = _bad(server, [{"name": "image"}])
    assert status == 400 and message.startswith("malformed inference request: inputs.0.")
    session = StudentSession(model, "cpu")
    infer(server, tensor=_batch(session, 1))


def test_refuses_to_start_on_a_file_that_is_not_a_student(tiny_export, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx at all")
    for path, expected in (
        (other, "not a jointdistill export"),
        (garbage, "not a loadable ONNX model"),
        (tmp_path / "missing.onnx", "no such model file"),
    ):
        r = subprocess.run(
            [sys.executable, "-c", NO_TORCH_SERVE, "serve", str(path), "--port", str(_free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and expected in r.stderr


def test_serves_a_published_model_from_gcs(gcs_emulator, tiny_export, tmp_path):
    root, _ = tiny_export
    make_bucket("served-models")
    manifest = __import__("jointdistill.cloud.storage", fromlist=["publish"]).publish(
        root / "export", "gs://served-models/student", "v1"
    )
    assert manifest["url"] == "gs://served-models/student/v1/"
    from jointdistill.cloud.storage import fetch_model_file

    path = fetch_model_file("gs://served-models/student/v1", tmp_path / "cache")
    assert path.read_bytes() == (root / "export" / "student.onnx").read_bytes()
    assert serve.make_model(path, "student", "cpu").ready


# ----------------------------------------------------------------------------- cluster deployment
STORAGE = "gs://models/jointdistill/student/0123abcd-89abcdef"
IMAGE = "europe-docker.pkg.dev/proj/ml/jointdistill:0.1.0"


def test_predictor_inference_service_field_by_field():
    isvc = deploy.predictor_service(
        STORAGE, IMAGE, "road-scenes", "team-a", gpu=True, cpu="4", memory="8Gi", service_account="kserve-gcs"
    )
    d = deploy.to_dict(isvc)
    assert (d["apiVersion"], d["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert d["metadata"]["name"] == "road-scenes" and d["metadata"]["namespace"] == "team-a"
    pred = d["spec"]["predictor"]
    assert pred["serviceAccountName"] == "kserve-gcs" and pred["minReplicas"] == 1
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and c["image"] == IMAGE
    assert c["args"] == [
        "serve",
        "/mnt/models/student.onnx",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--name",
        "road-scenes",
    ]
    assert c["env"] == [{"name": "STORAGE_URI", "value": STORAGE}]
    assert c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    probe = c["readinessProbe"]
    assert probe["httpGet"] == {"path": "/v2/models/road-scenes/ready", "port": 8080}
    back = deploy.from_dict(d)
    assert back.spec.predictor.containers[0].args == c["args"] and deploy.to_dict(back) == d
    with pytest.raises(ConfigError, match="unknown field.*storageUri"):  # misplaced: it belongs on a model spec
        deploy.from_dict({**d, "spec": {"predictor": {**pred, "storageUri": STORAGE}}})
    cpu_only = deploy.to_dict(deploy.predictor_service(STORAGE, IMAGE, "road-scenes"))
    assert "nvidia.com/gpu" not in cpu_only["spec"]["predictor"]["containers"][0]["resources"]["limits"]


def test_triton_inference_service_field_by_field():
    d = deploy.to_dict(deploy.triton_service(STORAGE, "road-scenes-triton", gpu=True))
    model = d["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2" and model["storageUri"] == f"{STORAGE}/triton"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "containers" not in d["spec"]["predictor"]  # no code of ours
    assert deploy.to_dict(deploy.from_dict(d)) == d


def test_manifest_command_writes_both_services(tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "serve",
            "manifest",
            "--storage-uri",
            STORAGE,
            "--image",
            IMAGE,
            "--name",
            "road-scenes",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    ours = yaml.safe_load((tmp_path / "road-scenes.yaml").read_text())
    triton = yaml.safe_load((tmp_path / "road-scenes-triton.yaml").read_text())
    assert ours == deploy.to_dict(deploy.predictor_service(STORAGE, IMAGE, "road-scenes"))
    assert triton == deploy.to_dict(deploy.triton_service(STORAGE, "road-scenes-triton"))
    with pytest.raises(ConfigError, match="gs://"):
        deploy.predictor_service("/local/model", IMAGE, "x")
    with pytest.raises(ConfigError, match="DNS label"):
        deploy.triton_service(STORAGE, "Road_Scenes")
    bad = CliRunner().invoke(app, ["serve", "manifest", "--storage-uri", "s3://x/y", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "gs://" in bad.output


def test_publish_lays_out_a_triton_repository(gcs_emulator, tiny_export, tmp_path):
    root, _ = tiny_export
    make_bucket("triton-models")
    from jointdistill.cloud.storage import fetch_model, publish

    publish(root / "export", "gs://triton-models/s", "v1")
    got = fetch_model("gs://triton-models/s/v1", tmp_path / "fetched")
    names = {e["name"] for e in got["files"]}
    assert {"triton/student/1/model.onnx", "triton/student/config.pbtxt", "student.onnx"} <= names
    repo = tmp_path / "fetched" / "triton" / "student"
    assert (repo / "1" / "model.onnx").read_bytes() == (root / "export" / "student.onnx").read_bytes()
    config = (repo / "config.pbtxt").read_text()
    classes = len(StudentSession(root / "export" / "student.onnx", "cpu").classes)
    assert 'name: "student"' in config and 'platform: "onnxruntime_onnx"' in config
    assert 'name: "image" data_type: TYPE_FP32 dims: [ -1, 3, -1, -1 ]' in config
    assert f'name: "segmentation_logits" data_type: TYPE_FP32 dims: [ -1, {classes}, -1, -1 ]' in config
    assert 'name: "depth" data_type: TYPE_FP32 dims: [ -1, 1, -1, -1 ]' in config
