"""Inference with the exported student: onnxruntime, numpy and Pillow only (never torch).

This module is what a deployment needs (`jointdistill predict`, the serving container); importing it must
not import torch, and a test runs it in a process where torch cannot be imported.

The exported model's contract: input ``image`` float32 N×3×H×W, RGB scaled to [0, 1] then
normalised with the metadata's ``mean``/``std``; outputs ``segmentation_logits`` N×C×H×W and ``depth``
N×1×H×W in metres. Every ``metadata_props`` value is JSON.
"""

from __future__ import annotations

import io as _io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jointdistill.errors import DataError, ModelError, OutputError, brief
from jointdistill.evaluation.pictures import colorize_depth
from jointdistill.io import atomic_write_bytes

ONNX_FORMAT = "jointdistill.onnx/1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("segmentation_logits", "depth")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
REQUIRED_METADATA = ("format", "classes", "palette", "input_size", "mean", "std", "depth_unit")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def read_metadata(props: dict[str, str], source: str = "model") -> dict:
    """Decode ``metadata_props`` (every value is JSON) and check the keys inference relies on."""
    meta = {}
    for key, value in props.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise ModelError(f"{source}: metadata {key!r} is not JSON ({value[:60]!r})") from None
    if meta.get("format") != ONNX_FORMAT:
        raise ModelError(
            f"{source}: not a jointdistill export (metadata format {meta.get('format')!r}, "
            f"expected {ONNX_FORMAT!r}); export one with `jointdistill export`"
        )
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(f"{source}: metadata lacks {', '.join(missing)}")
    return meta


def choose_providers(device: str = "auto") -> tuple[list[str], str | None]:
    """Execution providers for ``device`` (auto | cpu | cuda), and a note when auto falls back to the CPU.

    CUDA is used when onnxruntime-gpu is installed (``pip install jointdistill[gpu]``) and sees a GPU; the
    CPU provider always follows it, so nodes CUDA lacks still run.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU], None
    if device == "cuda":
        if CUDA not in available:
            raise ModelError(
                "device cuda: this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu: pip install 'jointdistill[gpu]')"
            )
        return [CUDA, CPU], None
    if device != "auto":
        raise ModelError(f"device {device!r}: expected auto, cpu or cuda")
    if CUDA in available:
        return [CUDA, CPU], None
    return [CPU], "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)"


class StudentSession:
    """One onnxruntime session over an exported student, with its metadata and pre/post-processing."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self._argmax: Any = None  # the post-processing session (onnxruntime), made on first use
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        providers, self.fallback_reason = choose_providers(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings would repeat what we say once
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelError(f"{self.path}: not a loadable ONNX model ({brief(exc, 200)})") from None
        self.provider = self.session.get_providers()[0]
        if providers[0] == CUDA and self.provider != CUDA:
            if device == "cuda":
                raise ModelError(f"{self.path}: onnxruntime could not start CUDA (no usable GPU?)")
            self.fallback_reason = "onnxruntime-gpu found no usable GPU"
        self.meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [INPUT_NAME] or tuple(names_out) != OUTPUT_NAMES:
            raise ModelError(
                f"{self.path}: inputs {names_in} / outputs {names_out}, expected [{INPUT_NAME!r}] / "
                f"{list(OUTPUT_NAMES)}"
            )
        self.classes: list[str] = list(self.meta["classes"])
        self.palette = np.asarray(self.meta["palette"], np.uint8)
        ih, iw = (int(v) for v in self.meta["input_size"])
        self.input_size = (ih, iw)
        self.mean = np.asarray(self.meta["mean"], np.float32).reshape(1, 1, 3)
        self.std = np.asarray(self.meta["std"], np.float32).reshape(1, 1, 3)

    @property
    def device_note(self) -> str:
        return "GPU (CUDAExecutionProvider)" if self.provider == CUDA else "CPU (CPUExecutionProvider)"

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB → 3×h×w float32 at the model's input size, normalised as in training."""
        h, w = self.input_size
        if rgb.shape[:2] != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        x = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def labels(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (N×H×W int64) of N×C×H×W logits: argmax over C, first index on ties like numpy's, but in
        onnxruntime, which reads the channels contiguously (with the model's run, 512×1024 on 2 cores: 55 ms
        instead of 66 ms with numpy's strided argmax)."""
        if self._argmax is None:
            import onnxruntime as ort
            from onnx import TensorProto, helper

            graph = helper.make_graph(
                [helper.make_node("ArgMax", ["logits"], ["labels"], axis=1, keepdims=0)],
                "argmax",
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None, None, None])],
                [helper.make_tensor_value_info("labels", TensorProto.INT64, [None, None, None])],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # One thread: right after the model's run its thread pool still spins, and a second multi-threaded
            # pool fighting it doubles the time on a small CPU.
            options.intra_op_num_threads = 1
            self._argmax = ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])
        return self._argmax.run(None, {"logits": np.ascontiguousarray(logits, np.float32)})[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw outputs for a normalised N×3×H×W float32 batch: (logits N×C×H×W, depth N×1×H×W metres)."""
        seg, depth = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return seg, depth

    def predict(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per RGB image: (class ids H×W uint8, depth H×W float32 metres) at the image's own size."""
        if not images:
            return []
        seg, depth = self.run(np.stack([self.preprocess(im) for im in images]))
        labels = self.labels(seg).astype(np.uint8)
        out = []
        for im, lb, d in zip(images, labels, depth[:, 0], strict=True):
            h, w = im.shape[:2]
            if lb.shape != (h, w):
                lb = np.asarray(Image.fromarray(lb).resize((w, h), Image.Resampling.NEAREST))
                d = np.asarray(Image.fromarray(d.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
            out.append((lb, d.astype(np.float32)))
        return out


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, and the image files (by suffix, sorted) inside named folders."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)  # a missing or unreadable file is reported when it is read, with the others kept
    return found


def read_image(path: Path) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB; anything unreadable is a `DataError` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _png(pic: Image.Image) -> bytes:
    buf = _io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def write_prediction(
    out: Path, name: str, labels: np.ndarray, depth: np.ndarray, palette: np.ndarray, max_depth: float
) -> list[Path]:
    """``NAME.labels.png`` (palette PNG of class ids), ``NAME.depth.png`` (16-bit, millimetres, 0 = none) and
    ``NAME.depth_color.png`` (for people); each written atomically."""
    pal = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = palette
    pal.putpalette(flat.reshape(-1).tolist())
    mm = np.clip(np.round(np.nan_to_num(depth, nan=0.0) * 1000.0), 0, 65535).astype(np.uint16)
    files = {
        out / f"{name}.labels.png": _png(pal),
        out / f"{name}.depth.png": _png(Image.fromarray(mm)),
        out / f"{name}.depth_color.png": _png(Image.fromarray(colorize_depth(depth, max_depth, min(2.0, max_depth)))),
    }
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return list(files)


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)  # the images whose outputs were written
    failed: list[tuple[Path, str]] = field(default_factory=list)
    provider: str = CPU


def _unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}-{n + 1}")
    return names


def predict(
    session: StudentSession,
    images: Sequence[Path],
    out: str | Path,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> PredictReport:
    """Predict every image and write its three PNGs into ``out``. An image that cannot be read or written is
    recorded in ``report.failed`` and the others are still written. ``progress(n)`` is called per batch."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport(provider=session.provider)
    max_depth = float((session.meta.get("depth_range") or [0.5, 100.0])[1])
    names = _unique_names(list(images))
    batch_size = max(1, int(batch_size))
    for start in range(0, len(images), batch_size):
        chunk = list(zip(images[start : start + batch_size], names[start : start + batch_size], strict=True))
        loaded = []
        for path, name in chunk:
            try:
                loaded.append((path, name, read_image(path)))
            except DataError as exc:
                report.failed.append((path, str(exc)))
        results = session.predict([im for _, _, im in loaded])
        for (path, name, _), (labels, depth) in zip(loaded, results, strict=True):
            try:
                write_prediction(out, name, labels, depth, session.palette, max_depth)
                report.written.append(path)
            except (OSError, OutputError) as exc:
                report.failed.append((path, f"cannot write its outputs to {out} ({exc})"))
        if progress is not None:
            progress(len(chunk))
    return report
