"""ONNX export of the student: the graph (torch.onnx dynamo exporter), its metadata, optimised variants
(fp16, int8), and the numbers that say whether onnxruntime computes what PyTorch computes.

The exported contract is in `jointdistill.infer`. Height and width are dynamic in steps of
the encoder's stride (8): every size that is a multiple of it gives exactly the eager model's output.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import ModelError, brief
from .infer import INPUT_NAME, ONNX_FORMAT, OUTPUT_NAMES, StudentSession
from .metrics import ConfusionMatrix, DepthMeter

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8")


class OnnxStudent(nn.Module):
    """The student as the exported graph sees it: ``image`` → (``segmentation_logits``, ``depth``)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.student(image)
        return out["seg"], out["depth"]


def export_onnx(
    student: nn.Module, example: torch.Tensor, path: str | Path, opset: int, size_multiple: int | None
) -> None:
    """Export with the dynamo exporter. The batch axis is always dynamic (the example must hold ≥ 2 images,
    or the exporter specialises it to 1); H and W are dynamic in steps of ``size_multiple``, or fixed to the
    example's size when it is None."""
    import onnx
    from torch.export import Dim

    if example.shape[0] < 2:
        raise ValueError("the example batch must hold at least 2 images to keep the batch axis dynamic")
    axes: dict = {0: Dim("batch", min=1)}
    if size_multiple:
        h, w = example.shape[-2:]
        if h % size_multiple or w % size_multiple:
            raise ValueError(f"example size {h}×{w} is not a multiple of {size_multiple}")
        axes.update({2: size_multiple * Dim("h_steps", min=1), 3: size_multiple * Dim("w_steps", min=1)})
    wrapper = OnnxStudent(student).eval()
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines would drown the stage's own log
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": axes},
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the first line names the failing op
        raise ModelError(f"ONNX export failed: {brief(exc)}") from exc
    # The exporter notes its symbolic shape constraints on the graph, printed from a set whose order changes
    # between processes: dropped, so that the same student always gives the same file (and DVC the same hash).
    model = program.model_proto
    _drop_metadata(model.graph, "pkg.torch.export.")
    # Each node also carries the Python stack that traced it: absolute paths of this checkout and line numbers,
    # so the file would change with the directory it was built in or a reformatting of the model code.
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for node in nodes:
            _drop_metadata(node, STACK_TRACE)
    onnx.save(model, str(path))


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


@torch.no_grad()
def eager_outputs(student: nn.Module, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = student(torch.from_numpy(batch))
    return out["seg"].float().numpy(), out["depth"].float().numpy()


def evaluate_session(session: StudentSession, dataset, batch_size: int, num_classes: int, ignore_index: int) -> dict:
    """Exact test-set metrics (the same accumulation as the PyTorch evaluation) of an onnxruntime session."""
    cm, dm = ConfusionMatrix(num_classes, ignore_index), DepthMeter()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        seg, depth = session.run(torch.stack([it["image"] for it in items]).numpy())
        cm.update(torch.from_numpy(seg), torch.stack([it["label"] for it in items]))
        dm.update(torch.from_numpy(depth), torch.stack([it["depth"] for it in items]))
    metrics = {**cm.compute(), **dm.compute()}
    metrics.pop("per_class_iou")
    return metrics


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.median(times))


__all__ = [
    "OnnxStudent",
    "export_onnx",
    "metadata_props",
    "set_metadata",
    "check_graph",
    "fp16_variant",
    "int8_variant",
    "Parity",
    "parity_problems",
    "eager_outputs",
    "evaluate_session",
    "median_ms",
    "VARIANTS",
]
