"""Shared helpers: machine facts, timing statistics, subprocess runs pinned to one core, output files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine_info() -> dict:
    import numpy

    from jointdistill.provenance.records import cpu_model, usable_cores

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cores(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def run_json(code: str, env: dict | None = None, one_core: bool = True, timeout: int = 1800) -> dict:
    """Run ``code`` in a fresh interpreter (optionally pinned to one CPU); it prints one JSON object."""
    env = {**os.environ, **(env or {})}
    if one_core:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    prefix = ""
    if one_core and hasattr(os, "sched_getaffinity"):
        cpu = sorted(os.sched_getaffinity(0))[-1]
        prefix = f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
    r = subprocess.run([sys.executable, "-c", prefix + code], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_results(out_dir: Path, name: str, rows: list[dict], info: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{name}.json"
    md = out_dir / f"{name}.md"
    js.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    lines = [
        f"# Benchmarks: {name}",
        "",
        f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs; Python {info['python']}, "
        f"numpy {info['numpy']}; {info['date']}.",
        "",
        "| benchmark | median | min – max | unit | target | met |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        target = r.get("target")
        met = "" if target is None else ("yes" if r["ok"] else "**no**")
        lines.append(
            f"| {r['name']} | {r['median']:.4g} | {r['min']:.4g} – {r['max']:.4g} | {r['unit']} | "
            f"{target or ''} | {met} |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", *[f"- {r['name']}: {r['note']}" for r in notes]]
    md.write_text("\n".join(lines) + "\n")
    return js, md
