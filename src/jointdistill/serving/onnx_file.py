"""The exported ONNX file: its metadata, the optimised variants (fp16, int8), a graph check, and the numbers
that say whether onnxruntime computes what PyTorch computes. Nothing here imports torch; the export itself is
`jointdistill.models.export`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jointdistill import __version__
from jointdistill.errors import ModelError, brief
from jointdistill.serving.infer import INPUT_NAME, ONNX_FORMAT

log = logging.getLogger(__name__)


VARIANTS = ("fp32", "fp16", "int8")


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_metadata(proto, prefix: str) -> None:
    kept = [p for p in proto.metadata_props if not p.key.startswith(prefix)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)


def metadata_props(
    record: dict, meta: dict, size_multiple: int | None, opset: int, variant: str, code_digest: str | None
) -> dict[str, str]:
    """The model's ``metadata_props``: everything inference and lineage need, every value JSON."""
    norm = record.get("normalization") or meta["normalization"]
    config = record.get("config", {})
    props = {
        "format": ONNX_FORMAT,
        "variant": variant,
        "classes": list(record["classes"]),
        "palette": [list(map(int, c)) for c in record["palette"]],
        "ignore_index": int(record.get("ignore_index", meta.get("ignore_index", 255))),
        "input_size": list(record.get("resolution") or meta["resolution"]),
        "input_layout": "NCHW float32 RGB, scaled to [0, 1] then (x - mean) / std",
        "size_multiple": size_multiple,  # null: only input_size is valid
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "depth_unit": "m",
        "depth_range": list(meta.get("depth_range") or [0.5, 100.0]),
        "outputs": {"segmentation_logits": "N×C×H×W class logits", "depth": "N×1×H×W metres, > 0"},
        "distill_mode": record.get("mode"),
        "model": {"backbone": config.get("backbone"), "head": config.get("head")},
        "params_digest": record.get("params_digest"),
        "data_checksum": record.get("data_checksum"),
        "code_digest": code_digest,  # the exporting code's content digest (its lineage), not a git commit
        "opset": opset,
        "jointdistill_version": __version__,
    }
    return {k: json.dumps(v) for k, v in props.items()}


def set_metadata(path: str | Path, props: dict[str, str]) -> None:
    """Replace the model file's ``metadata_props`` with ``props`` (in place; the caller's folder is a temp)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "jointdistill student: semantic segmentation + monocular depth (see metadata_props)"
    onnx.save(model, str(path))


def check_graph(path: str | Path) -> None:
    """``onnx.checker.check_model(full_check=True)``: structure, opset, and shape inference."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ModelError(f"{path}: the exported graph fails onnx.checker ({brief(exc)})") from exc


def fp16_variant(src: str | Path, dst: str | Path) -> None:
    """Weights and activations in float16 for GPUs; the input and outputs stay float32, so the contract holds."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends the input's Cast node at the end; the checker (rightly) wants topological order.
    _toposort(model.graph)
    onnx.save(model, str(dst))


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the order for the checker to report
            ordered.extend(rest)
            break
        pending = rest
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over normalised val batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # pragma: no cover - the calibrators of onnxruntime ≥ 1.17 may call it
        pass


def int8_variant(src: str | Path, dst: str | Path, mode: str, calibration: Iterable[np.ndarray] = ()) -> None:
    """Int8 weights (``dynamic``: activations quantised at run time) or int8 weights and activations in QDQ
    form with ranges calibrated on ``calibration`` batches (``static``; MinMax, per-channel weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    pre = dst.with_name(dst.stem + ".pre.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            if mode == "dynamic":
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
            elif mode == "static":
                quantize_static(
                    str(pre),
                    str(dst),
                    _Calibration(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
            else:
                raise ValueError(f"int8 mode {mode!r}: expected dynamic or static")
        finally:
            pre.unlink(missing_ok=True)


class Parity:
    """Running comparison of onnxruntime's outputs with PyTorch eager's over batches of images."""

    def __init__(self):
        self.images = 0
        self.pixels = 0
        self.agree = 0
        self.seg_max = self.seg_sum = 0.0
        self.seg_n = 0
        self.d_max = self.d_sum = self.rel_max = self.rel_sum = 0.0

    def update(self, eager: tuple[np.ndarray, np.ndarray], onnx_out: tuple[np.ndarray, np.ndarray]) -> None:
        (es, ed), (os_, od) = eager, onnx_out
        if es.shape != os_.shape or ed.shape != od.shape:
            raise ModelError(
                f"onnxruntime output shapes {os_.shape}, {od.shape} differ from eager's {es.shape}, "
                f"{ed.shape}: the exported graph has a size baked in"
            )
        err = np.abs(os_.astype(np.float64) - es)
        self.seg_max = max(self.seg_max, float(err.max()))
        self.seg_sum += float(err.sum())
        self.seg_n += err.size
        self.agree += int((os_.argmax(1) == es.argmax(1)).sum())
        self.pixels += es.shape[0] * es.shape[2] * es.shape[3]
        d_err = np.abs(od.astype(np.float64) - ed)
        rel = d_err / np.maximum(ed, 1e-6)
        self.d_max = max(self.d_max, float(d_err.max()))
        self.d_sum += float(d_err.sum())
        self.rel_max = max(self.rel_max, float(rel.max()))
        self.rel_sum += float(rel.sum())
        self.images += es.shape[0]

    def result(self) -> dict:
        depth_n = max(self.pixels, 1)
        return {
            "images": self.images,
            "segmentation_logits": {
                "max_abs_err": self.seg_max,
                "mean_abs_err": self.seg_sum / max(self.seg_n, 1),
                "argmax_agreement": self.agree / max(self.pixels, 1),
            },
            "depth": {
                "max_abs_err": self.d_max,
                "mean_abs_err": self.d_sum / depth_n,
                "max_rel_err": self.rel_max,
                "mean_rel_err": self.rel_sum / depth_n,
            },
        }


def parity_problems(result: dict, depth_rel_tol: float, seg_agreement_min: float) -> list[str]:
    """What breaks the tolerance in one `Parity.result()`; empty when it holds."""
    problems = []
    rel = result["depth"]["max_rel_err"]
    agree = result["segmentation_logits"]["argmax_agreement"]
    if not rel <= depth_rel_tol:  # NaN fails too
        problems.append(f"depth max relative error {rel:.3g} > {depth_rel_tol:g}")
    if not agree >= seg_agreement_min:
        problems.append(f"segmentation argmax agreement {agree:.5f} < {seg_agreement_min:g}")
    return problems


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times))
