"""KFP component for the `distill` stage: consumes the prepared data and the two teacher Model artifacts.

``distill`` trains in the step's own pod; ``distill_job`` (``pipeline.trainjob.enabled``) launches a Kubeflow
Trainer job of the same image and command and waits for it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(
    params: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Output[Model],
    metrics: Output[Metrics],
):
    """Train the multi-task student (distill.mode) into the output artifact's directory."""
    from jointdistill.config import params_from_dict
    from jointdistill.distill.plan import uses_teachers
    from jointdistill.stages import distill as stage
    from jointdistill.stages.results import record_artifact

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    teachers = (teacher_seg.path, teacher_depth.path) if uses_teachers(cfg.distill.mode) else None
    result = stage.run(cfg, prepared.path, teachers, student.path)
    record_artifact(student, result, metrics)


def distill_job(
    params: dict,
    image: str,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Output[Model],
    metrics: Output[Metrics],
):
    """Train the student in a Kubeflow Trainer job (N nodes × M GPUs) and wait for it."""
    from jointdistill.cloud import trainjob
    from jointdistill.config import params_from_dict
    from jointdistill.stages.results import StudentResult, record_artifact

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    inputs = {"data": prepared.uri, "teacher_seg": teacher_seg.uri, "teacher_depth": teacher_depth.uri}
    report = trainjob.run_step(cfg, "distill", image, inputs, student.uri, student.path)
    record_artifact(student, StudentResult(report), metrics)


def component(image: str):
    return dsl.component(distill, base_image=image, install_kfp_package=False)


def job_component(image: str):
    return dsl.component(distill_job, base_image=image, install_kfp_package=False)
