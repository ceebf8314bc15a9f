"""The Kubeflow pipeline: compiled IR loaded back by kfp, and executed for real with kfp.local."""

import pytest
import yaml
from jointdistill.pipelines import pipeline as kfp_pipeline
from kfp import components

from jointdistill.config import load_params


@pytest.fixture(scope="module")
def compiled(tiny_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "jointdistill.yaml"
    kfp_pipeline.compile_pipeline(path, tiny_params, image="registry.example/jointdistill:test")
    return path


def root_params_default(ir, name):
    return ir["root"]["inputDefinitions"]["parameters"][name].get("defaultValue")


def test_compiled_ir_loads_back(compiled, tiny_params):
    loaded = components.load_component_from_file(str(compiled))
    assert loaded.name == "jointdistill"
    assert "params" in loaded.component_spec.inputs
    ir = yaml.safe_load(compiled.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "source",
        "prepare",
        "train-teacher",
        "train-teacher-2",
        "distill",
        "evaluate",
        "export",
        "condition-1",
    }
    # The optional last step: inside a condition on results_remote (empty by default = off), after everything,
    # with every output and the run's name; never cached (a push must happen each run).
    cond = tasks["condition-1"]
    assert cond["taskInfo"]["name"] == "results-to-dvc" and "results_remote" in cond["triggerPolicy"]["condition"]
    assert "!= ''" in cond["triggerPolicy"]["condition"] and root_params_default(ir, "results_remote") == ""
    push = ir["components"][cond["componentRef"]["name"]]["dag"]["tasks"]["push-results"]
    assert set(push["inputs"]["artifacts"]) == {
        "prepared",
        "teacher_seg",
        "teacher_depth",
        "student",
        "evaluation",
        "onnx_model",
    }
    assert push["inputs"]["parameters"]["run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert not push["cachingOptions"].get("enableCache")
    # The data source comes first: prepare reads its Dataset; the pin is three run parameters, empty by default.
    assert tasks["prepare"]["dependentTasks"] == ["source"]
    assert tasks["prepare"]["inputs"]["artifacts"]["source"]["taskOutputArtifact"]["producerTask"] == "source"
    root_params = ir["root"]["inputDefinitions"]["parameters"]
    assert {k: root_params[k].get("defaultValue") for k in ("data_repo", "data_rev", "data_path")} == dict.fromkeys(
        ("data_repo", "data_rev", "data_path"), ""
    )
    assert tasks["source"]["inputs"]["parameters"]["repo"]["componentInputParameter"] == "data_repo"
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["distill", "prepare", "train-teacher", "train-teacher-2"]
    eval_outs = ir["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert eval_outs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    # The run page's confusion-matrix widget and per-class IoU: typed outputs, and pipeline outputs too.
    assert eval_outs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert eval_outs["class_iou"]["artifactType"]["schemaTitle"] == "system.Metrics"
    pipeline_outs = ir["root"]["outputDefinitions"]["artifacts"]
    assert pipeline_outs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    # export is the last step: it takes the student and runs once the evaluation has.
    assert sorted(tasks["export"]["dependentTasks"]) == ["distill", "evaluate", "prepare"]
    assert tasks["export"]["inputs"]["artifacts"]["student"]["taskOutputArtifact"]["producerTask"] == "distill"
    export_outs = ir["components"]["comp-export"]["outputDefinitions"]["artifacts"]
    assert export_outs["onnx_model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert export_outs["model_card"]["artifactType"]["schemaTitle"] == "system.Markdown"
    # Caching set explicitly per task: on for data prep and the teachers, off for the rest (params.pipeline).
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"prepare", "train-teacher", "train-teacher-2"}
    for t in [t for n, t in tasks.items() if n != "condition-1"] + [push]:
        assert t["retryPolicy"]["maxRetryCount"] == 2 and t["retryPolicy"]["backoffDuration"] == "60s"
    resources = ir["deploymentSpec"]["executors"]["exec-train-teacher"]["container"]["resources"]
    assert resources["resourceCpuLimit"] == "4" and resources["resourceMemoryLimit"] == "16G"
    assert "accelerator" not in resources  # CPU by default
    teacher_tasks = {
        t["inputs"]["parameters"]["task"]["runtimeValue"]["constant"]: t
        for n, t in tasks.items()
        if n.startswith("train-teacher")
    }
    assert set(teacher_tasks) == {"seg", "depth"}
    for t in teacher_tasks.values():
        assert t["dependentTasks"] == ["prepare"]  # both teachers wait for prepare only: they run in parallel
        assert t["inputs"]["artifacts"]["prepared"]["taskOutputArtifact"]["producerTask"] == "prepare"
    # distill consumes the prepared data and both teachers' Model artifacts.
    dist = tasks["distill"]
    assert sorted(dist["dependentTasks"]) == ["prepare", "train-teacher", "train-teacher-2"]
    arts = dist["inputs"]["artifacts"]
    producers = {name: a["taskOutputArtifact"]["producerTask"] for name, a in arts.items()}
    assert producers["prepared"] == "prepare"
    assert {producers["teacher_seg"], producers["teacher_depth"]} == {"train-teacher", "train-teacher-2"}
    assert tasks[producers["teacher_seg"]]["inputs"]["parameters"]["task"]["runtimeValue"]["constant"] == "seg"
    ins = ir["components"]["comp-distill"]["inputDefinitions"]["artifacts"]
    assert ins["teacher_seg"]["artifactType"]["schemaTitle"] == "system.Model"
    outs = ir["components"]["comp-distill"]["outputDefinitions"]["artifacts"]
    assert outs["student"]["artifactType"]["schemaTitle"] == "system.Model"
    default = ir["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert default["prepare"]["num_samples"] == tiny_params.prepare.num_samples
    for executor in ir["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == "registry.example/jointdistill:test"
        assert "pip install" not in " ".join(executor["container"]["command"])
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


GPU = [
    "pipeline.teacher.accelerator_type=nvidia.com/gpu",
    "pipeline.teacher.accelerator_limit=1",
    "pipeline.distill.accelerator_type=nvidia.com/gpu",
    "pipeline.distill.accelerator_limit=2",
    "pipeline.node_selector={cloud.google.com/gke-accelerator: nvidia-l4}",
    "pipeline.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
]


def test_gpu_requests_and_placement_for_training_steps(tmp_path):
    from jointdistill.config import load_params

    from .conftest import REPO

    path = kfp_pipeline.compile_pipeline(tmp_path / "p.yaml", load_params(REPO / "params.yaml", GPU))
    ir, platform = yaml.safe_load_all(path.read_text())
    executors = ir["deploymentSpec"]["executors"]
    for name, count in (("exec-train-teacher", "1"), ("exec-train-teacher-2", "1"), ("exec-distill", "2")):
        acc = executors[name]["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == count
    assert "accelerator" not in executors["exec-evaluate"]["container"]["resources"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {"exec-train-teacher", "exec-train-teacher-2", "exec-distill"}  # training steps only
    for spec in k8s.values():
        assert spec["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert components.load_component_from_file(str(path)).name == "jointdistill"


def test_compile_refuses_an_accelerator_limit_kfp_rejects(tmp_path):
    from typer.testing import CliRunner

    from jointdistill.cli import app

    r = CliRunner().invoke(
        app,
        [
            "pipeline",
            "compile",
            "-o",
            str(tmp_path / "p.yaml"),
            "--set",
            "pipeline.teacher.accelerator_limit=3",
            "--set",
            "pipeline.teacher.accelerator_type=nvidia.com/gpu",
        ],
    )
    assert r.exit_code == 2 and "3 is not an accelerator limit KFP accepts (0, 1, 2, 4, 8, 16)" in r.output
    assert not (tmp_path / "p.yaml").exists()


def test_submit_speaks_the_kfp_api(monkeypatch):
    from typer.testing import CliRunner

    from jointdistill.cli import app
    from jointdistill.config import load_params

    from .conftest import REPO
    from .kfp_api import FakeKfpApi

    monkeypatch.setenv("KFP_TOKEN", "secret-token")
    with FakeKfpApi() as api:
        args = [
            "pipeline",
            "submit",
            "--host",
            api.url,
            "--experiment",
            "nightly",
            "--run-name",
            "r1",
            "--image",
            "registry.example/jointdistill:7",
            "--set",
            "distill.epochs=3",
        ]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        assert [(q["method"], q["path"]) for q in api.requests] == [
            ("GET", "/apis/v2beta1/healthz"),
            ("GET", "/apis/v2beta1/experiments"),
            ("POST", "/apis/v2beta1/experiments"),
            ("POST", "/apis/v2beta1/runs"),
        ]
        assert all(q["authorization"] == "Bearer secret-token" for q in api.requests)
        assert api.requests[2]["body"]["display_name"] == "nightly"
        run = api.requests[3]["body"]
        assert run["display_name"] == "r1" and run["experiment_id"] == next(iter(api.experiments))
        expected = kfp_pipeline.pipeline_params(load_params(REPO / "params.yaml", ["distill.epochs=3"]))
        assert run["runtime_config"]["parameters"]["params"] == expected
        spec = run["pipeline_spec"]
        assert spec["pipelineInfo"]["name"] == "jointdistill"
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
            "registry.example/jointdistill:7"
        }
        run_id = next(iter(api.runs))
        assert f"submitted run {run_id} (r1) in experiment nightly: {api.url}/#/runs/details/{run_id}" in r.output

        # A second run reuses the experiment; --no-cache turns caching off for every step of this run only.
        r = CliRunner().invoke(app, [*args[:-2], "--no-cache"])
        assert r.exit_code == 0, r.output
        assert [(q["method"], q["path"]) for q in api.requests[4:]] == [
            ("GET", "/apis/v2beta1/healthz"),
            ("GET", "/apis/v2beta1/experiments"),
            ("POST", "/apis/v2beta1/runs"),
        ]
        tasks = api.requests[-1]["body"]["pipeline_spec"]["root"]["dag"]["tasks"]
        assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())

        api.fail_runs_with = 403
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and f"error: submit to {api.url}: HTTP 403" in r.output


# ----------------------------------------------------------------------------- the ablation pipeline
ABLATION = [
    "teacher.batch_size=4",
    "teacher.epochs=1",
    "distill.batch_size=4",
    "distill.epochs=1",
    "distill.probe_images=2",
]


def test_ablation_pipeline_compiles_to_nested_fan_outs_and_one_aggregate(tmp_path):
    """`pipeline compile --ablation`: ParallelFor over seeds (data, both teachers) around ParallelFor over the
    variants (distill → evaluate), each level gathered with Collected; resources and retries from params."""
    from typer.testing import CliRunner

    from jointdistill.cli import app

    from .conftest import REPO

    out = tmp_path / "jointdistill-ablation.yaml"
    args = ["pipeline", "compile", "--ablation", "--params", str(REPO / "params.yaml"), "-o", str(out)]
    r = CliRunner().invoke(app, [*args, "--modes", "single,static_kd,full+deficit", "--seeds", "3,4"])
    assert r.exit_code == 0, r.output
    assert components.load_component_from_file(str(out)).name == "jointdistill-ablation"
    ir = yaml.safe_load(out.read_text())
    assert root_params_default(ir, "seeds") == [3, 4]
    assert [v["name"] for v in root_params_default(ir, "variants")] == ["static_kd", "full+deficit"]
    assert root_params_default(ir, "variants")[1]["changes"] == {"distill.mode": "full", "distill.feedback": "deficit"}
    root = ir["root"]["dag"]["tasks"]
    assert set(root) == {"for-loop-1", "aggregate"} and root["for-loop-1"]["taskInfo"]["name"] == "seeds"
    seeds = ir["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(seeds) == {"prepare", "train-teacher", "train-teacher-2", "for-loop-2", "seed-rows"}
    assert seeds["for-loop-2"]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--variants"
    assert set(ir["components"]["comp-for-loop-2"]["dag"]["tasks"]) == {"distill", "evaluate"}
    gathered = seeds["seed-rows"]["inputs"]["artifacts"]["rows"]["taskOutputArtifact"]
    assert gathered["producerTask"] == "for-loop-2"  # Collected over the variants
    assert root["aggregate"]["inputs"]["artifacts"]["seed_rows"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert root["aggregate"]["inputs"]["parameters"]["teachers"]["runtimeValue"]["constant"] is True
    executors = ir["deploymentSpec"]["executors"]
    for name, step in (("exec-distill", "distill"), ("exec-train-teacher", "teacher"), ("exec-prepare", "prepare")):
        want = getattr(load_params(REPO / "params.yaml").pipeline, step)
        assert executors[name]["container"]["resources"]["resourceCpuLimit"] == want.cpu
        assert executors[name]["container"]["resources"]["resourceMemoryLimit"] == want.memory
    loop = ir["components"]["comp-for-loop-2"]["dag"]["tasks"]
    assert loop["distill"]["retryPolicy"]["maxRetryCount"] == 2
    # Rows that need their own data or teachers per seed, and rows given to the main pipeline, are refused.
    r = CliRunner().invoke(app, [*args, "--vary", "prepare.val_fraction=0.1,0.25"])
    assert r.exit_code == 2 and "run them with `jointdistill ablate`" in r.stderr
    r = CliRunner().invoke(app, ["pipeline", "compile", "-o", str(tmp_path / "x.yaml"), "--modes", "mtl"])
    assert r.exit_code == 2 and "add --ablation" in r.stderr and not (tmp_path / "x.yaml").exists()
    r = CliRunner().invoke(app, ["pipeline", "run-local", "--ablation", "--data-repo", "x", "--root", str(tmp_path)])
    assert r.exit_code == 2 and "it takes no data_repo" in r.stderr


@pytest.mark.slow  # 17 kfp.local steps, each its own process, then the same runs in-process
def test_ablation_pipeline_under_kfp_local_equals_ablate(tmp_path):
    """2 seeds × 2 modes (and the teachers' row) through the compiled ablation pipeline's nested ParallelFor and
    Collected under kfp.local, then `ablate` in this process on the same params: the same rows, table and pairs."""
    import json

    from jointdistill.pipelines import ablation as kfp_ablation

    from jointdistill import ablation as ablate

    from .conftest import REPO, TINY

    p = load_params(REPO / "params.yaml", [*TINY, *ABLATION])
    modes, seeds = ["single", "mtl", "static_kd"], [0, 1]
    outputs = kfp_ablation.run_local(p, tmp_path / "kfp", modes=modes, seeds=seeds)
    table_dir = outputs["ablation"].path
    piped = json.loads(open(f"{table_dir}/ablation.json").read())
    assert open(outputs["view"].path).read() == open(f"{table_dir}/ablation.md").read()
    ablate.run(p, None, tmp_path / "abl", modes=modes, seeds=seeds)
    direct = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [(r["seed"], r["mode"]) for r in piped["runs"]] == [(s, m) for s in seeds for m in modes]
    assert piped == direct
    assert open(f"{table_dir}/ablation.md").read() == (tmp_path / "abl" / "ablation.md").read_text()
    mean = direct["pairs"][0]["delta_m"]["mean"]
    assert outputs["paired"].metadata == {"delta_m/static_kd - mtl": pytest.approx(mean)}  # the run page's metric
