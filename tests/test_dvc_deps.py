"""dvc.yaml's deps are right by construction: each stage lists its module's import closure and the params sections
it reads, no more and no less (computed here from the code, without running DVC)."""

import ast

import pytest
import yaml

from jointdistill.config import STAGE_PARAMS
from jointdistill.provenance import codeid

from .conftest import REPO

SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
MODULES = {
    "prepare": "prepare",
    "train-teacher": "teacher",
    "distill": "distill",
    "evaluate": "evaluate",
    "export": "export",
}


def _stage(name):
    stage = SPEC[name]
    return stage.get("do", stage)


def _code_deps(stage) -> set[str]:
    return {d for d in stage["deps"] if d.startswith("src/")}


def _covered(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", list(MODULES))
def test_code_deps_are_the_import_closure(name):
    deps = _code_deps(_stage(name))
    closure = {p.relative_to(REPO).as_posix() for p in codeid.closure(f"jointdistill.stages.{MODULES[name]}")}
    missing = sorted(p for p in closure if not _covered(p, deps))
    assert not missing, f"{name}: dvc.yaml misses code it imports: {missing}"
    extra = sorted(d for d in deps if not any(p == d or p.startswith(d + "/") for p in closure))
    assert not extra, f"{name}: dvc.yaml lists code it does not import: {extra}"


@pytest.mark.parametrize("name", list(MODULES))
def test_params_deps_are_the_sections_the_stage_reads(name):
    listed = _stage(name)["params"]
    sections = {p.split(".")[0] for p in listed}
    assert sections == set(STAGE_PARAMS[MODULES[name]]), name


def test_each_stage_reads_only_its_sections():
    """Every ``params.<section>`` a stage module reads is one of its sections (an ast walk over the module)."""
    for module in set(MODULES.values()):
        tree = ast.parse((codeid.ROOT / "stages" / f"{module}.py").read_text())
        read = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params"
        }
        sections = read - {"digest", "model_copy", "model_dump", "stage_params"}
        assert sections <= set(STAGE_PARAMS[module]), f"{module} reads {sections - set(STAGE_PARAMS[module])}"


def test_closure_follows_imports_and_parent_packages(tmp_path):
    closure = {p.relative_to(codeid.ROOT).as_posix() for p in codeid.closure("jointdistill.stages.export")}
    assert {
        "stages/export.py",
        "models/export.py",
        "serving/infer.py",
        "serving/onnx_file.py",
        "data/prepared.py",
        "__init__.py",
        "stages/__init__.py",
        "serving/__init__.py",
        "models/__init__.py",
    } <= closure
    assert "serving/server.py" not in closure and "cli.py" not in closure


def test_code_digest_ignores_comments_and_docstrings_not_code(tmp_path, monkeypatch):
    pkg = tmp_path / "jointdistill"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "a.py").write_text('"""Doc."""\nfrom . import b\n\n\ndef f():\n    """Doc."""\n    return b.X\n')
    (pkg / "b.py").write_text("X = 1\n")
    monkeypatch.setattr(codeid, "ROOT", pkg)
    codeid.closure.cache_clear()
    try:
        first = codeid.source_digest("jointdistill.a")
        (pkg / "a.py").write_text('"""Other words."""\nfrom . import b  # a comment\n\n\ndef f():\n    return b.X\n')
        assert codeid.source_digest("jointdistill.a") == first
        (pkg / "b.py").write_text("X = 2\n")  # a change in what it imports
        assert codeid.source_digest("jointdistill.a") != first
    finally:
        codeid.closure.cache_clear()
