"""KFP component for the `train-teacher` stage (one task per teacher, run in parallel)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_teacher(params: dict, task: str, prepared: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    """Train the `task` teacher on the prepared data; the model folder is the output artifact."""
    from jointdistill.config import params_from_dict
    from jointdistill.stages import teacher as stage

    report = stage.run(params_from_dict(params, "pipeline parameter 'params'"), task, prepared.path, teacher.path)
    key = report["monitor"]
    teacher.metadata.update({"task": task, "monitor": key, "val": report["val"][key], "test": report["test"][key],
                             "best_epoch": report["best_epoch"], "params_digest": report["params_digest"]})
    for split in ("val", "test"):
        for name, value in report[split].items():
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{split}/{name}", value)


def component(image: str):
    return dsl.component(train_teacher, base_image=image, install_kfp_package=False)
