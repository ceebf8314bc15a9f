"""KFP component for the `evaluate` stage: the student against both teachers; the report is an HTML artifact."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate(
    params: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Input[Model],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    confusion: Output[ClassificationMetrics],
    class_iou: Output[Metrics],
):
    """Evaluate on test into the ``evaluation`` folder; expose Δm and the metrics, the student's confusion matrix
    (with class names: the run page's confusion-matrix widget), its IoU per class, and the report as HTML."""
    import shutil

    from jointdistill.config import params_from_dict
    from jointdistill.stages import evaluate as stage
    from jointdistill.stages.results import record_artifact

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    result = stage.run(cfg, prepared.path, (teacher_seg.path, teacher_depth.path), student.path, evaluation.path)
    record_artifact(evaluation, result, metrics)
    student_split = result["student"][result.split]
    confusion.log_confusion_matrix(list(student_split["per_class_iou"]), student_split["confusion_matrix"])
    for name, iou in student_split["per_class_iou"].items():
        if iou is not None:  # a class absent from the split has no IoU
            class_iou.log_metric(f"iou/{name}", iou)
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)


def component(image: str):
    return dsl.component(evaluate, base_image=image, install_kfp_package=False)
