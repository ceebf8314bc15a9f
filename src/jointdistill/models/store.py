"""Trained model files (``model.pt``): weights plus everything needed to rebuild and use the model."""

from __future__ import annotations

from pathlib import Path

import torch

from jointdistill.errors import ModelError
from jointdistill.models.nets import ModelConfig, MultiHeadNet
from jointdistill.models.serialization import check_fit, load_safe, save_atomic

MODEL_FORMAT = "jointdistill.model/1"


def save_model(path: str | Path, model: MultiHeadNet, state_dict: dict | None = None, **info) -> None:
    save_atomic(
        path,
        {
            "format": MODEL_FORMAT,
            "config": model.config.to_dict(),
            "state_dict": state_dict if state_dict is not None else model.state_dict(),
            **info,
        },
    )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiHeadNet, dict]:
    """Rebuild a saved model (weights_only loading); any mismatch is a `ModelError` naming the keys."""
    record = load_safe(path, "model", MODEL_FORMAT, map_location)
    try:
        model = MultiHeadNet(ModelConfig.from_dict(record["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model {path}: bad model config ({exc})") from None
    state = record.get("state_dict", {})
    check_fit(model.state_dict(), state, f"model {path}: weights do not fit its config")
    model.load_state_dict(state)
    return model, record
