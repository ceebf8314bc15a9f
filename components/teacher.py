"""KFP component for the `train-teacher` stage (one task per teacher, run in parallel).

Two forms of the same step: ``train_teacher`` trains in the step's own pod; ``train_teacher_job``
(``pipeline.trainjob.enabled``) launches a Kubeflow Trainer job of the same image and command and waits for it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def record(report: dict, task: str, teacher, metrics) -> None:
    """The step's artifact metadata and metrics from the stage's metrics.json."""
    from jointdistill import lineage

    key = report["monitor"]
    teacher.metadata["lineage"] = lineage.read(teacher.path)
    teacher.metadata["source_commit"] = lineage.source_commit() or ""
    teacher.metadata.update(
        {
            "task": task,
            "monitor": key,
            "val": report["val"][key],
            "test": report["test"][key],
            "best_epoch": report["best_epoch"],
            "params_digest": report["params_digest"],
        }
    )
    for split in ("val", "test"):
        for name, value in report[split].items():
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{split}/{name}", value)


def train_teacher(params: dict, task: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    """Train the `task` teacher on the prepared data; the model folder is the output artifact."""
    from jointdistill.components.teacher import record

    from jointdistill.config import params_from_dict
    from jointdistill.stages import teacher as stage

    report = stage.run(params_from_dict(params, "pipeline parameter 'params'"), task, prepared.path, teacher.path)
    record(report, task, teacher, metrics)


def train_teacher_job(
    params: dict, task: str, image: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]
):
    """Train the `task` teacher in a Kubeflow Trainer job (N nodes × M GPUs) and wait for it."""
    from jointdistill.components.teacher import record

    from jointdistill import trainjob
    from jointdistill.config import params_from_dict

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    report = trainjob.run_step(cfg, "teacher", image, {"data": prepared.uri}, teacher.uri, teacher.path, task=task)
    record(report, task, teacher, metrics)


def component(image: str):
    return dsl.component(train_teacher, base_image=image, install_kfp_package=False)


def job_component(image: str):
    return dsl.component(train_teacher_job, base_image=image, install_kfp_package=False)
