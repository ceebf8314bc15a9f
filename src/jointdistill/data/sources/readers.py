"""Readers the source adapters share: RGB images, PNG label and depth arrays, class tables (YAML or JSON)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from jointdistill.errors import DataError


def default_color(i: int) -> tuple[int, int, int]:
    """Distinct, stable colours for classes the table gives none."""
    h = hashlib.sha256(f"class-{i}".encode()).digest()
    return (h[0], h[1], h[2])


def load_table(path: Path):
    """A small YAML or JSON file (class tables, class maps), or one clear error."""
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def parse_classes(table, path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """The ``classes`` list of a class table: names, or {name, color} entries; id = position."""
    entries = (table or {}).get("classes") if isinstance(table, dict) else None
    if not entries or not isinstance(entries, list):
        raise DataError(f"{path}: expected a non-empty list under 'classes'")
    names, colors = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            names.append(entry)
            colors.append(default_color(i))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.append(entry["name"])
            color = entry.get("color", default_color(i))
            if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(0 <= int(c) <= 255 for c in color)):
                raise DataError(f"{path}: class {entry['name']!r}: color must be [r, g, b] in 0..255")
            r, g, b = (int(c) for c in color)
            colors.append((r, g, b))
        else:
            raise DataError(f"{path}: classes[{i}] must be a name or {{name: …, color: [r, g, b]}}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat")
    return tuple(names), tuple(colors)


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def read_png_array(path: Path) -> np.ndarray:
    """A single-channel PNG (8- or 16-bit) as integers, exactly as stored."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"{path}: a {im.mode} image; expected one channel (8- or 16-bit ids or depth)")
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable PNG ({exc})") from None
