"""What a stage writes beside its output, apart from its content: the numbers DVC and Kubeflow show, and the facts
of this one run.

A stage output (``--out``) holds only what the inputs determine, so the same inputs give the same bytes and DVC
the same hash on one machine. Everything else goes to the stage's metrics folder (``--metrics``; by default the
output folder itself, as Kubeflow and a plain CLI run want it):

    metrics.json   a short, curated set of numbers (test metrics, time, cost): what `dvc metrics show`,
                   `dvc exp show` and the Kubeflow run page display
    run.json       the facts of this run: wall-clock times, throughput, latency, the machine, resumption
    dvclive/       the training curves (dvclive stamps every row with the time)

The details (every metric of every split, per-class values, the configuration) stay in the output's
``report.json``. dvc.yaml points ``--metrics`` at ``metrics/<stage>/``, committed to git (``cache: false``),
so that `dvc metrics diff` works in a fresh clone.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jointdistill.io import atomic_dir, write_json

METRICS, RUN, LIVE, REPORT = "metrics.json", "run.json", "dvclive", "report.json"
# Keys whose values belong to the run, not to the result: taken out of a report wherever they occur.
_RUN_KEYS = {
    "machine",
    "resumed_from_step",
    "reused",
    "latency_runs",
    "teacher_forward_images",
    "source_commit",
    "seconds_per_step",
    "path",
}
_RUN_SUFFIXES = ("seconds", "_share", "per_second", "_ms")


def is_run_key(key: str) -> bool:
    return key in _RUN_KEYS or key.endswith(_RUN_SUFFIXES) or "latency" in key


def split(report):
    """(content, run): ``report`` without its run facts, and those facts at the same places (None if none)."""
    if isinstance(report, dict):
        content, run = {}, {}
        for key, value in report.items():
            if is_run_key(str(key)):
                run[key] = value
                continue
            content[key], sub = split(value)
            if sub is not None:
                run[key] = sub
        return content, (run or None)
    if isinstance(report, list):
        parts = [split(v) for v in report]
        runs = [r for _, r in parts]
        return [c for c, _ in parts], (runs if any(r is not None for r in runs) else None)
    return report, None


def numbers(metrics: dict, where: str = "metrics") -> dict:
    """``metrics`` checked to hold only finite numbers (nested one level at most); None values are dropped."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = numbers(value, f"{where}.{key}")
        elif value is None:
            continue
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}.{key}: a metrics file holds numbers only, got {value!r}")
        else:
            out[key] = round(float(value), 6) if math.isfinite(value) else None
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict:
    """Where the run happened: CPU model, usable cores, library versions (and the GPU, if torch sees one)."""
    import sys
    from importlib import metadata

    info = {"cpu": cpu_model(), "cores": usable_cores(), "python": platform.python_version()}
    for package in ("torch", "onnxruntime", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")  # not imported for this: prepare runs without torch
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextmanager
def folder(out_tmp: Path, metrics_dir: str | Path | None) -> Iterator[Path]:
    """The folder to write metrics.json, run.json and dvclive/ into: the output being written (``out_tmp``) when
    ``metrics_dir`` is None, else ``metrics_dir``, replaced atomically."""
    if metrics_dir is None:
        yield out_tmp
        return
    with atomic_dir(metrics_dir) as tmp:
        yield tmp


def write(dest: Path, metrics: dict, run: dict | None, live: Path | None = None) -> None:
    """metrics.json (numbers only), run.json (the run's facts, with the machine) and a copy of ``live``."""
    write_json(dest / METRICS, numbers(metrics))
    write_json(dest / RUN, {**(run or {}), "machine": machine()})
    if live is not None and live.is_dir():
        shutil.copytree(live, dest / LIVE, dirs_exist_ok=True)


__all__ = ["METRICS", "RUN", "LIVE", "REPORT", "split", "numbers", "machine", "folder", "write", "is_run_key"]
