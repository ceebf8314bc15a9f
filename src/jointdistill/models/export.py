"""ONNX export of the student (torch.onnx's dynamo exporter).

The exported contract is in `jointdistill.serving.infer`. Height and width are dynamic in steps of the encoder's
stride (8): every size that is a multiple of it gives exactly the eager model's output.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jointdistill.errors import ModelError, brief
from jointdistill.serving.infer import INPUT_NAME, OUTPUT_NAMES
from jointdistill.serving.onnx_file import STACK_TRACE, _drop_metadata


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
    assert program is not None  # dynamo=True always returns a program
    model = program.model_proto
    _drop_metadata(model.graph, "pkg.torch.export.")
    # Each node also carries the Python stack that traced it: absolute paths of this checkout and line numbers,
    # so the file would change with the directory it was built in or a reformatting of the model code.
    for nodes in (model.graph.node, *(f.node for f in model.functions)):
        for node in nodes:
            _drop_metadata(node, STACK_TRACE)
    onnx.save(model, str(path))


@torch.no_grad()
def eager_outputs(student: nn.Module, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = student(torch.from_numpy(batch))
    return out["seg"].float().numpy(), out["depth"].float().numpy()
