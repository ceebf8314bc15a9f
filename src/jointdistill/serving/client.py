"""The client side of the Open Inference Protocol v2 with the binary-data extension: encoding a request and
decoding a response (used by tests, benchmarks and users' scripts; tritonclient works as well).
"""

from __future__ import annotations

import base64

import numpy as np

# ----------------------------------------------------------------------------- client side (tests, bench, users)
IMAGE = "image"  # FP32 N×3×H×W, normalised
IMAGE_BYTES = "image_bytes"  # BYTES [N]: PNG/JPEG files
OUTPUTS = ("segmentation", "depth")
HEADER_LENGTH = "Inference-Header-Content-Length"  # the v2 binary-data extension


def encode_request(
    tensor: np.ndarray | None = None,
    images: list[bytes] | None = None,
    binary: bool = False,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An infer request body and its headers: a normalised N×3×H×W ``tensor`` or encoded ``images`` (files'
    bytes). ``binary`` sends the input and asks for the outputs with the v2 binary-data extension (no JSON
    floats, no base64: much faster); otherwise everything is JSON (image files as base64 text)."""
    import json

    if (tensor is None) == (images is None):
        raise ValueError("give a tensor or images")
    header: dict = {"id": request_id} if request_id else {}
    raw = b""
    if tensor is not None:
        x = np.ascontiguousarray(tensor, np.float32)
        inp: dict = {"name": IMAGE, "datatype": "FP32", "shape": list(x.shape)}
        if binary:
            raw = x.tobytes()
            inp["parameters"] = {"binary_data_size": len(raw)}
        else:
            inp["data"] = x.reshape(-1).tolist()
    else:
        assert images is not None
        inp = {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [len(images)]}
        if binary:  # the v2 BYTES layout: each element's length (uint32, little-endian), then its bytes
            raw = b"".join(len(b).to_bytes(4, "little") + b for b in images)
            inp["parameters"] = {"binary_data_size": len(raw)}
        else:
            inp["data"] = [base64.b64encode(b).decode() for b in images]
    header["inputs"] = [inp]
    if binary:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUTS]
    text = json.dumps(header).encode()
    headers = {"Content-Type": "application/json" if not binary else "application/octet-stream"}
    if binary:
        headers[HEADER_LENGTH] = str(len(text))
    return text + raw, headers


def decode_response(body: bytes, headers) -> dict[str, np.ndarray]:
    """``{output name: array}`` from an infer response, JSON or binary-data extension."""
    import json

    length = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
    head = json.loads(body[: int(length)] if length else body)
    offset = int(length) if length else 0
    out = {}
    for o in head["outputs"]:
        dtype = {"INT32": np.int32, "FP32": np.float32}[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out
