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

    from jointdistill.config import params_from_dict
    from jointdistill.stages import export as stage
    from jointdistill.stages.results import record_artifact

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    result = stage.run(cfg, prepared.path, student.path, onnx_model.path)
    record_artifact(onnx_model, result, metrics)
    shutil.copyfile(f"{onnx_model.path}/MODEL_CARD.md", model_card.path)


def component(image: str):
    return dsl.component(export, base_image=image, install_kfp_package=False)
