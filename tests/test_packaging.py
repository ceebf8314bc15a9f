import tomllib

from .conftest import REPO


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = REPO / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    found |= {"jointdistill.components", "jointdistill.pipelines"}
    assert found == listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_lock_pins_what_must_be_pinned():
    lock = (REPO / "requirements.lock").read_text().splitlines()
    pins = {ln.split("==")[0]: ln.split("==")[1].split(" ")[0] for ln in lock if "==" in ln and not ln.startswith("#")}
    pyproject = (REPO / "pyproject.toml").read_text()
    for name in ("kfp", "protobuf"):
        assert f'"{name}=={pins[name]}"' in pyproject, name
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
