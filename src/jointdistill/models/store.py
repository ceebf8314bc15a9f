"""Trained model files (``model.pt``): weights plus everything needed to rebuild and use the model."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..io import atomic_write_bytes
from .nets import DenseNet, ModelConfig

MODEL_FORMAT = "jointdistill.model/1"


def save_model(path: str | Path, model: DenseNet, state_dict: dict | None = None, **info) -> None:
    record = {"format": MODEL_FORMAT, "config": model.config.to_dict(),
              "state_dict": state_dict if state_dict is not None else model.state_dict(), **info}
    buf = io.BytesIO()
    torch.save(record, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model (weights_only loading); any mismatch is a `ModelError` naming the keys."""
    path = Path(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"model {path}: file not found") from None
    except Exception as exc:
        raise ModelError(f"model {path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ModelError(f"model {path}: not a jointdistill model file (format {MODEL_FORMAT})")
    try:
        config = ModelConfig.from_dict(record["config"])
        model = DenseNet(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model {path}: bad model config ({exc})") from None
    own, state = model.state_dict(), record.get("state_dict", {})
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
        parts = [f"{w}: {show(k)}" for w, k in (("missing", missing), ("unexpected", unexpected),
                                                 ("wrong shape", wrong)) if k]
        raise ModelError(f"model {path}: weights do not fit its config: " + "; ".join(parts))
    model.load_state_dict(state)
    return model, record
