"""Serve the exported student over the Open Inference Protocol v2 with KServe's model server.

    jointdistill serve data/export/student.onnx [--host 127.0.0.1] [--port 8080] [--name student]

A ``kserve.Model`` over one onnxruntime session (CUDA when onnxruntime-gpu sees a GPU), started with
``kserve.ModelServer``, so the same server runs on a laptop and as a KServe predictor. Endpoints (REST):

- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/<name>/ready``
- ``GET /v2/models/<name>``: the v2 metadata (inputs, outputs) plus ``parameters``: our model's metadata
  (classes, palette, depth unit and range, input size rules, normalisation)
- ``POST /v2/models/<name>/infer`` with exactly one input:
  ``image``: FP32 N×3×H×W, normalised as the ONNX contract says (H, W the model takes), or
  ``image_bytes``: BYTES [N], PNG/JPEG files (base64 strings in JSON, or raw with the binary-data extension),
  decoded, normalised and resized here; outputs come back at each image's own size (one size per request).
  Outputs: ``segmentation`` INT32 N×H×W class ids, ``depth`` FP32 N×H×W metres; a request that names
  ``outputs`` gets those only, each in JSON or binary as it asks (``binary_data``).

Requests come as the standard clients send them (`tritonclient.http` included): JSON with or without a
``Content-Type``, the binary-data extension, and gzip- or deflate-compressed bodies (``Content-Encoding``).
A bad request gets HTTP 400 with a message naming the problem, and the server keeps serving. Each request is one
line in the server's log (method, path, status, time, and a client error's message). Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io as _io
import logging
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from jointdistill.errors import ModelError
from jointdistill.serving.client import HEADER_LENGTH, IMAGE, IMAGE_BYTES, OUTPUTS
from jointdistill.serving.infer import StudentSession
from jointdistill.serving.middleware import Decompress, PayloadLimit, RequestLog, _NoClientErrors

log = logging.getLogger(__name__)


DEFAULT_MAX_PAYLOAD_MB = 64.0


# A decoded image larger than this is refused before its pixels are allocated (PIL reads the header first).
MAX_IMAGE_PIXELS = 40_000_000


def _invalid(message: str):
    from kserve.errors import InvalidInput

    return InvalidInput(message)


def make_model(path: str | Path, name: str = "student", device: str = "auto", threads: int | None = None):
    """A ready ``kserve.Model`` serving the exported student at ``path``; refuses anything that is not one."""
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    session = StudentSession(path, device=device, threads=threads)  # validates the file and its metadata

    class _Student(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.session = session
            multiple = session.meta.get("size_multiple")
            self.size_multiple = int(multiple) if multiple else None
            self.ready = True

        def get_input_types(self) -> list[dict]:
            return [
                {"name": IMAGE, "datatype": "FP32", "shape": [-1, 3, -1, -1]},
                {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
            ]

        def get_output_types(self) -> list[dict]:
            return [
                {"name": "segmentation", "datatype": "INT32", "shape": [-1, -1, -1]},
                {"name": "depth", "datatype": "FP32", "shape": [-1, -1, -1]},
            ]

        def parameters(self) -> dict:
            return _parameters(self.session, self.size_multiple)

        def _run_tensor(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            seg, depth = self.session.run(x)
            return self.session.labels(seg).astype(np.int32), np.ascontiguousarray(depth[:, 0], np.float32)

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            input_name, inp = _checked_request(payload)
            loop = asyncio.get_running_loop()
            if input_name == IMAGE:
                x = _checked_tensor(inp, self.session.input_size, self.size_multiple)
                labels, depth = await loop.run_in_executor(None, self._run_tensor, x)
            else:
                results = await loop.run_in_executor(None, self.session.predict, _checked_images(inp))
                labels = np.stack([lb for lb, _ in results]).astype(np.int32)
                depth = np.stack([d for _, d in results]).astype(np.float32)
            # Only the outputs asked for, each binary or JSON as its request says; with none named, all of them,
            # binary if the request's ``binary_data_output`` parameter says so (tritonclient's default).
            requested = payload.request_outputs or None
            all_binary = bool((payload.parameters or {}).get("binary_data_output")) and requested is None
            outputs = []
            for out_name, arr in (("segmentation", labels), ("depth", depth)):
                out = InferOutput(
                    name=out_name, shape=list(arr.shape), datatype="INT32" if arr.dtype == np.int32 else "FP32"
                )
                out.set_data_from_numpy(arr, binary_data=False)
                outputs.append(out)
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()),
                model_name=self.name,
                infer_outputs=outputs,
                requested_outputs=requested,
                use_binary_outputs=all_binary,
            )

    return _Student()


def _parameters(session: StudentSession, size_multiple: int | None) -> dict:
    """The model's ``parameters`` in its v2 metadata: what a client needs to build a request and read the answer."""
    m = session.meta
    h, w = session.input_size
    rule = f"H and W multiples of {size_multiple}" if size_multiple else f"exactly {h}×{w}"
    return {
        "format": m["format"],
        "classes": m["classes"],
        "palette": m["palette"],
        "ignore_index": m.get("ignore_index"),
        "depth_unit": m["depth_unit"],
        "depth_range": m.get("depth_range"),
        "input_size": [h, w],
        "size_multiple": size_multiple,
        "input_size_rule": f"'{IMAGE}': {rule}; '{IMAGE_BYTES}': any size (resized to {h}×{w})",
        "mean": m["mean"],
        "std": m["std"],
        "input_layout": m.get("input_layout"),
        "distill_mode": m.get("distill_mode"),
        "model": m.get("model"),
        "jointdistill_version": m.get("jointdistill_version"),
        "provider": session.provider,
    }


def _checked_request(payload) -> tuple[str, object]:
    """The request's one input (name, input), after checking its input and output names."""
    inputs = {inp.name: inp for inp in payload.inputs}
    unknown = sorted(set(inputs) - {IMAGE, IMAGE_BYTES})
    if unknown:
        raise _invalid(
            f"unknown input {', '.join(map(repr, unknown))}; send '{IMAGE}' (FP32 N×3×H×W) "
            f"or '{IMAGE_BYTES}' (BYTES, encoded images)"
        )
    if len(inputs) != 1:
        raise _invalid(f"send exactly one input, '{IMAGE}' or '{IMAGE_BYTES}' (got {len(inputs)})")
    wrong = sorted({o.name for o in payload.request_outputs or []} - set(OUTPUTS))
    if wrong:
        raise _invalid(f"unknown output {', '.join(map(repr, wrong))}; the outputs are {', '.join(map(repr, OUTPUTS))}")
    ((name, inp),) = inputs.items()
    return name, inp


def _checked_tensor(inp, input_size: tuple[int, int], size_multiple: int | None) -> np.ndarray:
    """The ``image`` input as a contiguous float32 N×3×H×W array the model takes, or a 400 naming the problem."""
    if inp.datatype != "FP32":
        raise _invalid(f"input '{IMAGE}': datatype {inp.datatype}, expected FP32")
    shape = list(inp.shape)
    if len(shape) != 4:
        raise _invalid(f"input '{IMAGE}': shape {shape} has rank {len(shape)}, expected 4 (N×3×H×W)")
    n, c, h, w = shape
    if n < 1:
        raise _invalid(f"input '{IMAGE}': empty batch (N = {n})")
    if c != 3:
        raise _invalid(f"input '{IMAGE}': {c} channels, expected 3 (RGB)")
    _check_size(h, w, input_size, size_multiple)
    try:
        x = inp.as_numpy()
    except (ValueError, TypeError) as exc:
        raise _invalid(f"input '{IMAGE}': data does not match shape {shape} ({exc})") from None
    if not np.isfinite(x).all():
        raise _invalid(f"input '{IMAGE}': contains NaN or infinite values")
    return np.ascontiguousarray(x, np.float32)


def _check_size(h: int, w: int, input_size: tuple[int, int], size_multiple: int | None) -> None:
    ih, iw = input_size
    if size_multiple:
        if h < 1 or w < 1 or h % size_multiple or w % size_multiple:
            raise _invalid(
                f"input '{IMAGE}': H×W {h}×{w} not accepted; this model takes H and W that are "
                f"multiples of {size_multiple} (e.g. {ih}×{iw})"
            )
    elif (h, w) != (ih, iw):
        raise _invalid(f"input '{IMAGE}': H×W {h}×{w} not accepted; this model takes exactly {ih}×{iw}")


def _checked_images(inp) -> list[np.ndarray]:
    """The ``image_bytes`` input decoded to RGB arrays of one size, or a 400 naming the problem."""
    if inp.datatype != "BYTES":
        raise _invalid(f"input '{IMAGE_BYTES}': datatype {inp.datatype}, expected BYTES")
    try:
        items = inp.as_numpy().reshape(-1).tolist()
    except (ValueError, TypeError) as exc:
        raise _invalid(f"input '{IMAGE_BYTES}': unreadable data ({exc})") from None
    if not items:
        raise _invalid(f"input '{IMAGE_BYTES}': empty batch")
    images = [_decode(item, i) for i, item in enumerate(items)]
    sizes = {im.shape[:2] for im in images}
    if len(sizes) > 1:
        raise _invalid(
            f"input '{IMAGE_BYTES}': images of different sizes {sorted(sizes)} in one request; "
            "send one request per size"
        )
    return images


def _decode(item, index: int) -> np.ndarray:
    """One element of ``image_bytes``: an image file's bytes (binary extension) or their base64 text (JSON)."""
    if isinstance(item, str):
        try:
            raw = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(
                f"input '{IMAGE_BYTES}'[{index}]: not base64 text (in JSON, send each image file "
                "base64-encoded; or raw bytes with the binary-data extension)"
            ) from None
    else:
        raw = bytes(item)
    try:
        with Image.open(_io.BytesIO(raw)) as im:
            size = im.size
            if size[0] * size[1] <= MAX_IMAGE_PIXELS:
                im.load()
                return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).split(" <")[0][:120]  # PIL names the BytesIO object: noise to a client
        raise _invalid(f"input '{IMAGE_BYTES}'[{index}]: not a decodable image ({reason})") from None
    raise _invalid(
        f"input '{IMAGE_BYTES}'[{index}]: {size[0]}×{size[1]} pixels is over the limit of {MAX_IMAGE_PIXELS}"
    )


def _metadata_route(app, model) -> None:
    """``GET /v2/models/<name>``: KServe's v2 metadata, plus our model's metadata as ``parameters`` (KServe's own
    handler drops fields the v2 schema does not list). Registered before KServe's routes, so it takes precedence."""
    from fastapi.responses import JSONResponse

    async def metadata(model_name: str):
        if model_name != model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, status_code=404)
        return {
            "name": model.name,
            "versions": None,
            "platform": "onnxruntime",
            "inputs": model.get_input_types(),
            "outputs": model.get_output_types(),
            "parameters": model.parameters(),
        }

    app.add_api_route("/v2/models/{model_name}", metadata, methods=["GET"])


def _decode_binary(body: bytes, json_length: int, model_name: str):
    """A v2 request in the binary-data extension, as KServe's ``InferRequest.from_bytes`` reads it but keeping
    each binary tensor as bytes: KServe turns them into Python lists (24 ms for one 3×128×256 image here, four
    times the model's own time), while ``InferInput.as_numpy`` reads raw bytes with ``np.frombuffer``."""
    import orjson
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    if not 0 < json_length <= len(body):
        raise _invalid(f"{HEADER_LENGTH} {json_length} does not fit a body of {len(body)} bytes")
    try:
        header = orjson.loads(body[:json_length])
        inputs, start = [], json_length
        for spec in header["inputs"]:
            inp = InferInput(
                name=spec["name"], shape=spec["shape"], datatype=spec["datatype"], parameters=spec.get("parameters")
            )
            if spec.get("data") is not None:
                inp.data = spec["data"]
            else:
                size = int((spec.get("parameters") or {})["binary_data_size"])
                if size < 0 or start + size > len(body):
                    raise _invalid(f"input {spec['name']!r}: binary_data_size {size} runs past the body")
                inp._raw_data = body[start : start + size]
                start += size
            inputs.append(inp)
        outputs = [
            RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in header.get("outputs") or []
        ] or None
    except InvalidInput:
        raise
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"malformed inference request: the JSON header is not JSON ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _invalid(f"malformed inference request: missing or bad field {exc}") from None
    return InferRequest(
        model_name=model_name,
        request_id=header.get("id"),
        parameters=header.get("parameters"),
        infer_inputs=inputs,
        request_outputs=outputs,
    )


def _decode_json(body: bytes, model_name: str):
    """A v2 JSON request that arrived as bytes: FastAPI parses JSON only under ``Content-Type: application/json``,
    which tritonclient does not send."""
    from kserve.protocol.infer_type import InferRequest
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "unreadable"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise _invalid(f"malformed inference request: {where + ': ' if where else ''}{first['msg']}") from None
    return InferRequest.from_inference_request(request, model_name)


def _fast_binary_decoding(dataplane) -> None:
    original = dataplane.decode_inference_request

    def decode(body, headers, model_name):
        length = (headers or {}).get(HEADER_LENGTH.lower())
        if isinstance(body, bytes) and length is not None and length.isdigit():
            return _decode_binary(body, int(length), model_name)
        if isinstance(body, bytes):
            return _decode_json(body, model_name)
        return original(body, headers, model_name)

    dataplane.decode_inference_request = decode


async def _malformed(request, exc):
    """FastAPI answers a body that is not a v2 request with 422 and a list; a client gets 400 and one line."""
    from fastapi.responses import JSONResponse

    errors = [e for e in exc.errors() if "InferenceRequest" in map(str, e.get("loc", ()))] or exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "unreadable"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "InferenceRequest"))
    return JSONResponse(
        {"error": f"malformed inference request: {where + ': ' if where else ''}{first['msg']}"}, status_code=400
    )


def resolve_model(source: str | Path) -> Path:
    """A local ``student.onnx``, or the export folder holding one. (A published ``gs://`` model is fetched by the
    caller first: `cloud.storage.fetch_model_file`; serving knows nothing of where models are stored.)"""
    path = Path(source)
    if path.is_dir():
        path = path / "student.onnx"
    if not path.is_file():
        raise ModelError(f"{source}: no such model file (expected student.onnx from `jointdistill export`)")
    return path


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    name: str = "student",
    device: str = "auto",
    max_payload_mb: float = DEFAULT_MAX_PAYLOAD_MB,
    threads: int | None = None,
) -> None:
    """Load the model (refusing a file that is not a jointdistill student), then serve until SIGINT/SIGTERM."""
    import sys

    # kserve.model_server parses sys.argv when imported: our options are not its options.
    sys.argv = sys.argv[:1]
    import kserve
    from fastapi.exceptions import RequestValidationError
    from kserve.logging import logger as kserve_logger
    from kserve.model_server import app

    kserve_logger.addFilter(_NoClientErrors())
    for quiet in ("uvicorn.access", "kserve.trace"):  # RequestLog writes the request's one line instead
        logging.getLogger(quiet).addFilter(lambda record: False)
    model = make_model(resolve_model(source), name=name, device=device, threads=threads)
    log.info("serving %s as %r on %s:%d (%s)", source, name, host, port, model.session.device_note)
    _metadata_route(app, model)
    app.add_exception_handler(RequestValidationError, _malformed)
    limit = int(max_payload_mb * 1024 * 1024)
    # Starlette runs the last added first: the request log sees every answer, the payload limit applies to the
    # compressed body as it arrives, and decompression to what it expands to.
    app.add_middleware(Decompress, limit=limit)
    app.add_middleware(PayloadLimit, limit=limit)
    app.add_middleware(RequestLog)

    class _Server(kserve.ModelServer):
        async def _serve(self):
            # KServe binds 0.0.0.0; the REST server's uvicorn config is read when it starts, right after this.
            if self._rest_server is not None:
                self._rest_server.config.host = host
            await super()._serve()

    server = _Server(http_port=port, enable_grpc=False, workers=1, enable_docs_url=False, enable_latency_logging=False)
    _fast_binary_decoding(server.dataplane)
    server.start([model])
