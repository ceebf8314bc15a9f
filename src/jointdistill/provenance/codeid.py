"""Which code made an output, named by its content rather than by git.

A stage's code is the import closure of its module inside this package (found with ``ast``, lazy imports
included, and every package ``__init__`` on the way). Its digest hashes each file's syntax tree without
docstrings, so a reformatting, a comment or a docstring edit leaves it unchanged, while any change to what the
code does changes it. The same closure is what dvc.yaml must list as the stage's code deps (tests/test_dvc.py
compares the two), and the same digest keys the stage's resumable checkpoints.

Nothing here reads git, the clock or absolute paths: the same source gives the same digest in any checkout.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

from jointdistill import __version__

PACKAGE = "jointdistill"
ROOT = Path(__file__).resolve().parents[1]  # src/jointdistill


def module_path(name: str) -> Path | None:
    """The file of ``jointdistill.x.y`` (module or package), or None if there is none."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _name_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file (relative imports resolved)."""
    name = _name_of(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import teacher`` imports a submodule, ``from .io import write_json`` a name.
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if module_path(m) is not None}


def _with_parents(module: str) -> set[str]:
    """A module and every package above it (importing a.b.c runs a/__init__ and a/b/__init__)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@cache
def closure(module: str) -> tuple[Path, ...]:
    """Every file of the package that importing ``module`` may run, sorted."""
    if module_path(module) is None:
        raise ValueError(f"{module}: not a module of {PACKAGE}")
    seen: set[str] = set()
    todo = list(_with_parents(module))
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        path = module_path(m)
        if path is not None:
            todo.extend(dep for dep in _with_parents_of(_imports(path)) if dep not in seen)
    return tuple(sorted(p for p in map(module_path, seen) if p is not None))


def _with_parents_of(modules: set[str]) -> set[str]:
    return {p for m in modules for p in _with_parents(m)}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised(path: Path) -> str:
    """The file's syntax tree without docstrings (no comments, no layout)."""
    return ast.dump(_strip_docstrings(ast.parse(path.read_text(encoding="utf-8"))))


def source_digest(module: str) -> str:
    """``sha256:`` over the package version and the normalised source of ``module``'s closure."""
    h = hashlib.sha256(f"{PACKAGE} {__version__}\n".encode())
    for path in closure(module):
        h.update(f"{path.relative_to(ROOT).as_posix()}\0".encode())
        h.update(hashlib.sha256(normalised(path).encode()).digest())
    return "sha256:" + h.hexdigest()


def code(module: str) -> dict:
    """The ``code`` record of a lineage: package, version and the source digest of ``module``'s closure."""
    return {"package": PACKAGE, "version": __version__, "module": module, "source": source_digest(module)}


__all__ = ["closure", "source_digest", "code", "normalised", "module_path"]
