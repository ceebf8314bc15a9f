"""The Kubeflow pipeline: compiled IR loaded back by kfp, and executed for real with kfp.local."""

import pytest
import yaml
from jointdistill.pipelines import pipeline as kfp_pipeline
from kfp import components

from jointdistill.data.contract import verify_prepared


@pytest.fixture(scope="module")
def compiled(tiny_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "jointdistill.yaml"
    kfp_pipeline.compile_pipeline(path, tiny_params, image="registry.example/jointdistill:test")
    return path


def test_compiled_ir_loads_back(compiled, tiny_params):
    loaded = components.load_component_from_file(str(compiled))
    assert loaded.name == "jointdistill"
    assert "params" in loaded.component_spec.inputs
    ir = yaml.safe_load(compiled.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare"}
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    default = ir["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert default["prepare"]["num_samples"] == tiny_params.prepare.num_samples
    executor = ir["deploymentSpec"]["executors"]["exec-prepare"]["container"]
    assert executor["image"] == "registry.example/jointdistill:test"
    assert "pip install" not in " ".join(executor["command"])
    outputs = ir["components"]["comp-prepare"]["outputDefinitions"]["artifacts"]
    assert outputs["prepared"]["artifactType"]["schemaTitle"] == "system.Dataset"


def test_cli_compile(tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    out = tmp_path / "p.yaml"
    r = CliRunner().invoke(app, ["pipeline", "compile", "-o", str(out), "--image", "img:1"])
    assert r.exit_code == 0, r.output
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    assert executors["exec-prepare"]["container"]["image"] == "img:1"


@pytest.mark.slow
def test_kfp_local_run_satisfies_the_data_contract(tiny_params, tmp_path):
    outputs = kfp_pipeline.run_local(tiny_params, tmp_path / "root")
    meta = verify_prepared(outputs["prepared"], check_digests=True)
    assert meta["resolution"] == [48, 96] and sum(meta["counts"].values()) == 40
    assert meta["params_digest"] == tiny_params.digest()
