"""Load on the local model server (`jointdistill serve`, KServe, Open Inference Protocol v2), 127.0.0.1 only.

For each concurrency level (1, 4, 16) clients send batch-1 requests at the model's input size for a fixed time
(30 s; 3 s with --quick), each on its own keep-alive connection, the tensor as the v2 binary-data extension
(what a performance-minded client sends; JSON floats cost far more to parse than the model takes to run).
Reported: requests/s, p50/p95/p99 latency, errors, and the server's RSS at the start and the end of the run.
Server overhead = p50 latency at concurrency 1 / onnxruntime's own median for the same input, timed alone in
a fresh process with the same threads, at the export's size and (dynamic-size exports) twice each side.
A last level sends PNG files (`image_bytes`, binary extension).

The model is the main job's export (data/export/student.onnx, from `make run`) unless --model says otherwise.
The clients run on the same cores as the server: on a small machine, the high-concurrency rows measure both.
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .common import run_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "data" / "export" / "student.onnx"

DIRECT = """
import json, statistics, time
import numpy as np
from jointdistill.serving.infer import StudentSession
s = StudentSession({model!r}, "cpu", threads={threads})
h, w = s.input_size
out = []
for scale in {scales!r}:
    x = np.random.default_rng(0).standard_normal((1, 3, h * scale, w * scale)).astype(np.float32)
    for _ in range(5):
        s.run(x)
    times = []
    end = time.perf_counter() + {seconds}
    while time.perf_counter() < end or len(times) < 20:
        t = time.perf_counter(); s.run(x); times.append((time.perf_counter() - t) * 1000)
    out.append({{"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times),
                 "size": [h * scale, w * scale]}})
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(model: Path, threads: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    log = open(os.devnull, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jointdistill", "serve", str(model), "--port", str(port), "--threads", str(threads)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def _client(port: int, body: bytes, headers: dict, until: float, lat: list, errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.perf_counter() < until:
        t = time.perf_counter()
        try:
            conn.request("POST", "/v2/models/student/infer", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if ok:
            lat.append((time.perf_counter() - t) * 1000)
        else:
            errors.append(1)
    conn.close()


def level(port: int, body: bytes, headers: dict, concurrency: int, seconds: float) -> dict:
    lat: list[float] = []
    errors: list[int] = []
    _client(port, body, headers, time.perf_counter() + 0.5, [], [])  # warm the connection path
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=_client, args=(port, body, headers, until, lat, errors)) for _ in range(concurrency)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = np.percentile(lat, [50, 95, 99]) if lat else [float("nan")] * 3
    return {
        "rps": len(lat) / wall,
        "p50": float(q[0]),
        "p95": float(q[1]),
        "p99": float(q[2]),
        "errors": len(errors),
        "requests": len(lat),
        "min": min(lat, default=float("nan")),
        "max": max(lat, default=float("nan")),
    }


def rows(quick: bool, params: str, model: str | Path | None = None) -> list[dict]:
    from PIL import Image

    from jointdistill.serving.client import encode_request
    from jointdistill.serving.infer import StudentSession

    model = Path(model or DEFAULT_MODEL)
    if not model.is_file():
        raise SystemExit(f"bench serve: {model} is missing; run `make run` first (or pass a model)")
    seconds = 3.0 if quick else 30.0
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    session = StudentSession(model, "cpu")
    # The export's own size, and twice each side where the model takes other sizes: the overhead per request
    # is mostly fixed plus the transfer, so its share shrinks as the model's work grows.
    scales = [1, 2] if session.meta.get("size_multiple") else [1]
    direct = run_json(
        DIRECT.format(model=str(model), threads=threads, seconds=min(seconds, 10.0), scales=scales), one_core=False
    )
    h, w = direct[0]["size"]
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    tensors = []
    for d in direct:
        x = np.random.default_rng(1).standard_normal((1, 3, *d["size"])).astype(np.float32)
        tensors.append(encode_request(tensor=x, binary=True))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png_body = encode_request(images=[buf.getvalue()], binary=True)
    del session

    proc, port = start(model, threads)
    try:
        rss_cold = rss_mb(proc.pid)
        # Warm-up, one second per level and input form: onnxruntime's arenas for concurrent runs and sizes, the
        # executor's threads, the PNG path. Growth is measured from here: what a long-running server would show.
        for c in (1, 4, 16):
            level(port, *tensors[0], c, 1.0)
        for body in (*tensors[1:], png_body):
            level(port, *body, 1, 1.0)
        rss_start = rss_mb(proc.pid)
        single = [level(port, *body, 1, seconds) for body in tensors]
        results = {1: single[0], **{c: level(port, *tensors[0], c, seconds) for c in (4, 16)}}
        results["png"] = level(port, *png_body, 1, seconds)
        rss_end = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    growth = rss_end / rss_start - 1
    total_errors = sum(r["errors"] for r in (*results.values(), *single[1:]))
    out = []
    for d, r in zip(direct, single):
        size = f"{d['size'][0]}×{d['size'][1]}"
        overhead = r["p50"] / d["median"] - 1
        out.append(
            {
                "name": f"onnxruntime direct, batch 1, {size}",
                "unit": "ms",
                "median": d["median"],
                "min": d["min"],
                "max": d["max"],
                "note": f"{d['n']} runs, {threads} threads",
            }
        )
        out.append(
            {
                "name": f"server latency, tensor {size}, concurrency 1",
                "unit": "ms",
                "median": r["p50"],
                "min": r["min"],
                "max": r["max"],
                "target": "p50 ≤ 1.2× onnxruntime direct",
                "ok": overhead <= 0.20,
                "overhead": overhead,
                "note": f"server overhead {overhead * 100:+.1f} % ({r['p50'] - d['median']:+.1f} ms) vs "
                f"onnxruntime direct; {r['rps']:.1f} req/s; p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms; "
                f"{r['requests']} requests, {r['errors']} errors",
            }
        )
    for key in (4, 16, "png"):
        r = results[key]
        what = f"PNG {h}×{w} (image_bytes), concurrency 1" if key == "png" else f"tensor {h}×{w}, concurrency {key}"
        out.append(
            {
                "name": f"server latency, {what}",
                "unit": "ms",
                "median": r["p50"],
                "min": r["min"],
                "max": r["max"],
                "note": f"{r['rps']:.1f} req/s; p95 {r['p95']:.1f} ms, p99 {r['p99']:.1f} ms; "
                f"{r['requests']} requests, {r['errors']} errors",
            }
        )
    out.append(
        {
            "name": "server errors over all levels",
            "unit": "count",
            "median": total_errors,
            "min": total_errors,
            "max": total_errors,
            "target": "0",
            "ok": total_errors == 0,
        }
    )
    out.append(
        {
            "name": "server RSS growth over the run",
            "unit": "%",
            "median": growth * 100,
            "min": growth * 100,
            "max": growth * 100,
            "target": "≤ 10 %",
            "ok": growth <= 0.10,
            "note": f"{rss_cold:.0f} MB when ready, {rss_start:.0f} MB after warm-up → {rss_end:.0f} MB at the end "
            f"({sum(r['requests'] for r in (*results.values(), *single[1:]))} requests)",
        }
    )
    return out
