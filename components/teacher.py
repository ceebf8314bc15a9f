"""KFP component for the `train-teacher` stage (one task per teacher, run in parallel).

Two forms of the same step: ``train_teacher`` trains in the step's own pod; ``train_teacher_job``
(``pipeline.trainjob.enabled``) launches a Kubeflow Trainer job of the same image and command and waits for it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_teacher(params: dict, task: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    """Train the `task` teacher on the prepared data; the model folder is the output artifact."""
    from jointdistill.config import params_from_dict
    from jointdistill.stages import teacher as stage
    from jointdistill.stages.results import record_artifact

    result = stage.run(params_from_dict(params, "pipeline parameter 'params'"), task, prepared.path, teacher.path)
    record_artifact(teacher, result, metrics)


def train_teacher_job(
    params: dict, task: str, image: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]
):
    """Train the `task` teacher in a Kubeflow Trainer job (N nodes × M GPUs) and wait for it."""
    from jointdistill.cloud import trainjob
    from jointdistill.config import params_from_dict
    from jointdistill.stages.results import TeacherResult, record_artifact

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    report = trainjob.run_step(cfg, "teacher", image, {"data": prepared.uri}, teacher.uri, teacher.path, task=task)
    record_artifact(teacher, TeacherResult(report), metrics)


def component(image: str):
    return dsl.component(train_teacher, base_image=image, install_kfp_package=False)


def job_component(image: str):
    return dsl.component(train_teacher_job, base_image=image, install_kfp_package=False)
