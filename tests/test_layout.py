"""The layout's rules, checked on the source (see docs/architecture.md): which way imports go, no import cycles,
a serving package without torch, and one place for the habits written once."""

import ast
import subprocess
import sys

import pytest

from jointdistill.provenance import codeid

from .conftest import NO_TORCH, REPO

ROOT = codeid.ROOT
MODULES = {codeid._name_of(p): p for p in sorted(ROOT.rglob("*.py"))}
IMPORTS = {name: codeid._imports(path) - {name} for name, path in MODULES.items()}
STAGES = {f"jointdistill.stages.{n}" for n in ("prepare", "teacher", "distill", "evaluate", "export")}
LIBRARY = ("data", "models", "training", "distill", "evaluation", "serving", "cloud", "provenance")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_stage_modules_never_import_each_other():
    for stage in STAGES:
        others = sorted(m for m in IMPORTS[stage] if m in STAGES)
        assert not others, f"{stage} imports the stage module(s) {others}; move what they share below the stages"


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_stages_or_adapters(package):
    for name, deps in IMPORTS.items():
        if _within(name, f"jointdistill.{package}"):
            up = sorted(m for m in deps if any(_within(m, f"jointdistill.{p}") for p in ("stages", "cli", "ablation")))
            assert not up, f"{name} imports {up}: the library sits below the stages and the CLI"


def test_no_import_cycles():
    """No chain of imports (lazy ones included) leads from a module back to itself."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(IMPORTS.get(m, ())):
            if dep not in MODULES:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [m, dep]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_the_source_registry_imports_no_adapter():
    adapters = {m for m in MODULES if _within(m, "jointdistill.data.sources")} - {
        "jointdistill.data.sources",
        "jointdistill.data.sources.registry",
    }
    assert not IMPORTS["jointdistill.data.sources.registry"] & adapters
    # ...while the package imports every adapter, so that each registers itself
    assert {m for m in adapters if m not in ("jointdistill.data.sources.readers",)} <= (
        _closure("jointdistill.data.sources")
    )


def _closure(module: str) -> set[str]:
    return {codeid._name_of(p) for p in codeid.closure(module)}


def test_no_serving_module_imports_torch():
    """Every module of `jointdistill.serving` imports in a process where importing torch fails, and leaves torch
    out of sys.modules (deployments install the package without it)."""
    serving = sorted(m for m in MODULES if _within(m, "jointdistill.serving"))
    assert "jointdistill.serving.server" in serving and len(serving) >= 6
    code = NO_TORCH + "".join(f"import {m}\n" for m in serving) + "assert 'torch' not in sys.modules\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_files_are_hashed_in_one_place():
    """Reading a file in chunks to hash it is `io.hash_file`'s job alone."""
    readers = sorted(
        name
        for name, path in MODULES.items()
        if "iter(lambda: f.read" in path.read_text(encoding="utf-8") and name != "jointdistill.io"
    )
    assert not readers, f"chunked file hashing outside io.hash_file: {readers}"


def test_tasks_are_named_in_one_place():
    """``("seg", "depth")`` is `models.TASKS`; every other module reads it from there."""
    defining = sorted(
        name
        for name, path in MODULES.items()
        if any(line.startswith("TASKS = ") for line in path.read_text(encoding="utf-8").splitlines())
    )
    assert defining == ["jointdistill.models.nets"], defining


# ----------------------------------------------------------------------------- what the distill refactor established
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("module", "function"), [*((s, "run") for s in sorted(STAGES)), ("jointdistill.training.engine", "fit")]
)
def test_stages_and_the_loop_read_top_to_bottom_in_about_80_lines(module, function):
    """A stage's ``run`` is verify → build → fit/score → write, and ``fit`` is place → restore → train; the steps
    are named functions, not inline blocks."""
    (fn,) = [n for n in _tree(module).body if isinstance(n, ast.FunctionDef) and n.name == function]
    lines = fn.end_lineno - fn.lineno + 1
    assert lines <= 90, f"{module}.{function} is {lines} lines long; move a step into a named function"


HOOKS = ("model_inputs", "end_timeframe", "state_dict", "load_state_dict", "progress", "clip_groups", "compile_targets")


def test_the_engine_never_discovers_hooks_with_getattr():
    """The optional hooks are declared once, with no-op defaults, on `Objective` and `Network`; the engine calls
    them, it does not probe for them."""
    from jointdistill.models.nets import Network
    from jointdistill.training.objectives import Objective

    found = []
    for name in (m for m in MODULES if _within(m, "jointdistill.training")):
        for node in ast.walk(_tree(name)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
            ):
                args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if set(args) & set(HOOKS):
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
    for hook in ("model_inputs", "end_timeframe", "state_dict", "load_state_dict", "progress"):
        assert hasattr(Objective, hook), hook
    for hook in ("clip_groups", "compile_targets"):
        assert hook in vars(Network), hook


def test_the_plan_is_the_one_place_that_interprets_the_mode():
    """No module but `distill.plan` compares ``distill.mode`` or ``kd_target`` (or a plan's ``kd_source``) with a
    value, or compares anything with a mode's name: the rest of the code asks the plan."""
    from jointdistill.distill.plan import MODES

    def literals(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {v for e in node.elts for v in literals(e)}
        return set()

    found = []
    sources = {**MODULES, **{f"components.{p.stem}": p for p in (REPO / "components").glob("*.py")}}
    sources |= {f"pipelines.{p.stem}": p for p in (REPO / "pipelines").glob("*.py")}
    sources |= {f"bench.{p.stem}": p for p in (REPO / "bench").glob("*.py")}
    for name, path in sources.items():
        if name == "jointdistill.distill.plan":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            attrs = any(isinstance(o, ast.Attribute) and o.attr in ("mode", "kd_target", "kd_source") for o in operands)
            words = {w for o in operands for w in literals(o)}
            if (attrs and words) or words & set(MODES):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    # A PIL image's mode is not a distill mode.
    found = [f for f in found if "im.mode" not in f]
    assert not found, found


def test_serving_never_reaches_cloud():
    """`serving/` is what a deployment installs; where a model is stored (gs://) is resolved by the adapters that
    call it. No serving module imports `cloud`, lazily or not, so there is no loop through the two."""
    for name in (m for m in MODULES if _within(m, "jointdistill.serving")):
        reached = {m for m in _closure(name) if _within(m, "jointdistill.cloud")}
        assert not reached, f"{name} reaches {sorted(reached)}"
