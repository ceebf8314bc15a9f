"""Loading trained models for the next stage, checked against what they will meet: the right task, the prepared
data's classes and normalisation. A wrong file is one clear error naming it, before any work starts."""

from __future__ import annotations

import logging
from pathlib import Path

from jointdistill.errors import DataError, ModelError
from jointdistill.io import file_sha256
from jointdistill.models.nets import MultiHeadNet
from jointdistill.models.store import load_model

log = logging.getLogger(__name__)


def load_teacher(path: str | Path, task: str, meta: dict) -> tuple[MultiHeadNet, dict]:
    """A teacher folder (or its model.pt), checked against its task and the prepared data."""
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"{task} teacher: {file}: missing (train it with `jointdistill train-teacher --task {task}`)")
    model, record = load_model(file)
    tasks = tuple(model.config.tasks)
    if tasks != (task,):
        what = "a multi-task model" if len(tasks) > 1 else f"the {tasks[0]} teacher"
        raise ModelError(
            f"{task} teacher {file}: this is {what}, not the {task} teacher "
            "(--teachers takes the seg teacher first, then the depth teacher)"
        )
    if task == "seg" and list(record.get("classes") or []) != list(meta["classes"]):
        raise DataError(
            f"seg teacher {file} predicts classes {record.get('classes')}, the prepared data has "
            f"{meta['classes']}: distill on data with the teacher's classes, or retrain the teacher"
        )
    norm = record.get("normalization")
    if norm is not None and norm != meta["normalization"]:
        raise DataError(
            f"{task} teacher {file} was trained on images normalised with {norm}, the prepared data "
            f"uses {meta['normalization']}"
        )
    if record.get("data_checksum") and record["data_checksum"] != meta.get("source_checksum"):
        log.warning(
            "%s teacher %s was trained on other prepared data (checksum %s, this data %s)",
            task,
            file,
            record["data_checksum"],
            meta.get("source_checksum"),
        )
    return model, {
        "path": str(path),
        "file_digest": file_sha256(file)[:16],
        "backbone": model.config.backbone,
        "head": model.config.head,
        "feature_channels": model.feature_channels,
    }


def load_student(path: str | Path, meta: dict, what: str = "student") -> tuple[MultiHeadNet, dict]:
    """A student folder (or its student.pt), checked to be multi-task and to predict the data's classes."""
    path = Path(path)
    file = path / "student.pt" if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"{what}: {file}: missing (train it with `jointdistill distill`)")
    model, record = load_model(file)
    if set(model.config.tasks) != {"seg", "depth"}:
        raise ModelError(f"{what} {file}: a single-task model ({model.config.tasks[0]}), not a multi-task student")
    if list(record.get("classes") or []) != list(meta["classes"]):
        raise DataError(f"{what} {file} predicts classes {record.get('classes')}, the data has {meta['classes']}")
    return model, record
