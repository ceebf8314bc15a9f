"""Torch files: safe loading (``weights_only=True`` always), atomic saving, and state-dict fit checks that
name the offending keys."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from jointdistill.errors import ModelError, brief
from jointdistill.io import atomic_write_bytes


def save_atomic(path: str | Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_safe(path: str | Path, what: str, fmt: str | None = None, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)``; a missing, corrupt or (with ``fmt``) foreign file is a ModelError."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{what} {path}: file not found") from None
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which this project never does.
        raise ModelError(
            f"{what} {path}: unreadable (not a torch file, or it holds more than tensors and plain containers)"
        ) from None
    except Exception as exc:  # truncated or corrupt archives raise from zipfile or torch itself
        raise ModelError(f"{what} {path}: unreadable ({type(exc).__name__}: {brief(exc, 200)})") from None
    if fmt is not None and (not isinstance(obj, dict) or obj.get("format") != fmt):
        raise ModelError(f"{what} {path}: not a jointdistill {what} file (format {fmt})")
    return obj


def check_fit(own: dict, state: dict, what: str) -> None:
    """Raise a ModelError listing missing, unexpected and wrongly shaped keys, if any."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong):
        return

    def show(keys):
        return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [
        f"{w}: {show(k)}" for w, k in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if k
    ]
    raise ModelError(f"{what}: " + "; ".join(parts))
