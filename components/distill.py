"""KFP component for the `distill` stage: consumes the prepared data and the two teacher Model artifacts.

``distill`` trains in the step's own pod; ``distill_job`` (``pipeline.trainjob.enabled``) launches a Kubeflow
Trainer job of the same image and command and waits for it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def record(report: dict, student, metrics) -> None:
    """The step's artifact metadata and metrics from the stage's metrics.json."""
    from jointdistill import lineage

    student.metadata["lineage"] = lineage.read(student.path)

    student.metadata["source_commit"] = lineage.source_commit() or ""
    student.metadata.update(
        {
            "mode": report["mode"],
            "best_epoch": report["best_epoch"],
            "final_weights": report["weights"]["final"],
            "params_digest": report["params_digest"],
            **{f"test_{k}": report["test"][k] for k in ("miou", "pixacc", "abs_err", "rel_err")},
        }
    )
    for split in ("val", "test"):
        for name, value in report[split].items():
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{split}/{name}", value)
    for task, w in report["weights"]["final"].items():
        metrics.log_metric(f"omega/{task}", w)


def distill(
    params: dict,
    prepared: Input[Dataset],
    teacher_seg: Input[Model],
    teacher_depth: Input[Model],
    student: Output[Model],
    metrics: Output[Metrics],
):
    """Train the multi-task student (distill.mode) into the output artifact's directory."""
    from jointdistill.components.distill import record

    from jointdistill.config import params_from_dict
    from jointdistill.stages import distill as stage

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    teachers = None if cfg.distill.mode == "mtl" else (teacher_seg.path, teacher_depth.path)
    report = stage.run(cfg, prepared.path, teachers, student.path)
    record(report, student, metrics)


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
    from jointdistill.components.distill import record

    from jointdistill import trainjob
    from jointdistill.config import params_from_dict

    cfg = params_from_dict(params, "pipeline parameter 'params'")
    inputs = {"data": prepared.uri, "teacher_seg": teacher_seg.uri, "teacher_depth": teacher_depth.uri}
    report = trainjob.run_step(cfg, "distill", image, inputs, student.uri, student.path)
    record(report, student, metrics)


def component(image: str):
    return dsl.component(distill, base_image=image, install_kfp_package=False)


def job_component(image: str):
    return dsl.component(distill_job, base_image=image, install_kfp_package=False)
