"""Rewrite the code deps of each stage in dvc.yaml to its module's import closure (what `codeid.closure` finds).

    python scripts/dvc_deps.py          # rewrite dvc.yaml in place
    python scripts/dvc_deps.py --check  # exit 1 if dvc.yaml differs (tests/test_dvc_deps.py checks the same)

Run it after moving a module or adding an import; only the ``src/`` lines of each stage's deps change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jointdistill.provenance import codeid

REPO = Path(__file__).resolve().parents[1]
STAGES = {"prepare": "prepare", "train-teacher": "teacher", "distill": "distill", "evaluate": "evaluate", "export": "export"}


def code_deps(stage: str) -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in codeid.closure(f"jointdistill.stages.{STAGES[stage]}"))


def rewritten(text: str) -> str:
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip().rstrip(":")
        if line.lstrip().startswith("- src/jointdistill/") and stage in STAGES:
            indent = line[: len(line) - len(line.lstrip())]
            while i < len(lines) and lines[i].lstrip().startswith("- src/jointdistill/"):
                i += 1
            out.extend(f"{indent}- {path}\n" for path in code_deps(stage))
            continue
        out.append(line)
        i += 1
    return "".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if dvc.yaml is out of date")
    args = parser.parse_args()
    path = REPO / "dvc.yaml"
    text = path.read_text()
    new = rewritten(text)
    if args.check:
        if new != text:
            print("dvc.yaml: code deps out of date; run python scripts/dvc_deps.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
