"""KFP component for the `export` stage: the student as ONNX (with its parity gate), and its model card."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def export(
    params: dict,
    prepared: Input[Dataset],
    student: Input[Model],
    onnx_model: Output[Model],
    metrics: Output[Metrics],
    model_card: Output[Markdown],
):
    """Export into the ``onnx_model`` folder (student.onnx, parity.json, metrics.json, MODEL_CARD.md, variants);
    the step fails if onnxruntime does not match PyTorch within export.depth_rel_tol / seg_agreement_min."""
    import shutil

    from jointdistill import lineage
    from jointdistill.config import params_from_dict
    from jointdistill.stages import export as stage

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    report = stage.run(cfg, prepared.path, student.path, onnx_model.path)
    val = report["parity"]["fp32"]["val"]
    onnx_model.metadata["lineage"] = lineage.read(onnx_model.path)
    onnx_model.metadata["source_commit"] = lineage.source_commit() or ""
    onnx_model.metadata.update(
        {
            "framework": "onnx",
            "file": "student.onnx",
            "opset": report["opset"],
            "variants": sorted(report["file_bytes"]),
            "params_digest": report["params_digest"],
            "parity_seg_argmax_agreement": val["segmentation_logits"]["argmax_agreement"],
            "parity_depth_max_rel_err": val["depth"]["max_rel_err"],
        }
    )
    for model, values in report["test_by_model"].items():
        for name, value in values.items():
            metrics.log_metric(f"test/{model}/{name}", value)
    for runtime, lat in report["latency_ms"].items():
        for name, value in lat.items():
            metrics.log_metric(f"latency/{runtime}/{name}", value)
    shutil.copyfile(f"{onnx_model.path}/MODEL_CARD.md", model_card.path)


def component(image: str):
    return dsl.component(export, base_image=image, install_kfp_package=False)
