"""Kubeflow Trainer jobs for the training steps: the TrainJob built with the SDK's models, submitted and followed
by the SDK's TrainerClient against a local Kubernetes API server, its command run for real (torchrun, 2
processes) against the GCS emulator, and the compiled pipeline that launches it."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import yaml
from jointdistill.pipelines.pipeline import compile_pipeline
from kfp import components
from kubeflow_trainer_api import models

from jointdistill.cloud import storage, trainjob
from jointdistill.config import load_params
from jointdistill.errors import ConfigError, DataError, OutputError

from .conftest import REPO, TINY, make_bucket
from .k8s_api import FakeTrainerApi

IMAGE = "europe-docker.pkg.dev/proj/ml/jointdistill:0.1.0"
ROOT = "gs://runs/pipeline-root/jointdistill/run-1"
GPU = [
    "pipeline.trainjob.enabled=true",
    "pipeline.trainjob.num_nodes=2",
    "pipeline.trainjob.gpus_per_node=4",
    "pipeline.trainjob.namespace=team-a",
]


def _params(*overrides):
    return load_params(REPO / "params.yaml", [*TINY, *overrides])


def _teacher_request(p, task="seg"):
    return trainjob.request(
        p,
        "teacher",
        IMAGE,
        f"{ROOT}/teacher.params.json",
        f"{ROOT}/prepare/prepared",
        f"{ROOT}/train-teacher/teacher",
        task=task,
    )


def test_teacher_job_spec_from_the_sdk_models():
    req = _teacher_request(_params(*GPU))
    m = trainjob.manifest(req)
    # What the SDK's models accept and give back unchanged is a TrainJob the Trainer's API can take.
    assert models.TrainerV1alpha1TrainJob.from_dict(m).to_dict() == m
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    name = m["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert m["metadata"]["namespace"] == "team-a"
    assert m["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "jointdistill",
        "jointdistill.io/stage": "teacher-seg",
    }
    spec = m["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    t = spec["trainer"]
    assert t["image"] == IMAGE and t["numNodes"] == 2
    assert t["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32G", "nvidia.com/gpu": "4"}
    assert t["resourcesPerNode"]["requests"] == t["resourcesPerNode"]["limits"]
    assert t["command"] == ["torchrun"]
    assert t["args"] == [
        "--nproc_per_node=4",
        "-m",
        "jointdistill",
        "train-teacher",
        "--task",
        "seg",
        "--params",
        f"{ROOT}/teacher.params.json",
        "--data",
        f"{ROOT}/prepare/prepared",
        "--out",
        f"{ROOT}/train-teacher/teacher.trainjob",
    ]
    env = {e["name"]: e["value"] for e in t["env"]}
    assert env["DVC_NO_ANALYTICS"] == "1" and "OMP_NUM_THREADS" not in env  # GPUs: torchrun's default
    assert spec["activeDeadlineSeconds"] == 86400
    # Unique per output artifact, stable for the same one (a retried step finds the same name).
    assert trainjob.manifest(_teacher_request(_params(*GPU)))["metadata"]["name"] == name
    assert trainjob.manifest(_teacher_request(_params(*GPU), "depth"))["metadata"]["name"] != name


def test_cpu_job_and_distill_job():
    p = _params("pipeline.trainjob.procs_per_node=2", "pipeline.trainjob.cpu_per_node=8")
    t = trainjob.manifest(_teacher_request(p))["spec"]["trainer"]
    assert t["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32G"} and t["numNodes"] == 1
    assert t["args"][0] == "--nproc_per_node=2"
    assert {e["name"]: e["value"] for e in t["env"]}["OMP_NUM_THREADS"] == "4"
    seg, depth = f"{ROOT}/t-seg/teacher", f"{ROOT}/t-depth/teacher"
    d = trainjob.request(
        p, "distill", IMAGE, "gs://b/p.json", "gs://b/prepared", f"{ROOT}/distill/student", teacher_urls=(seg, depth)
    )
    assert d.args[3:] == [
        "distill",
        "--params",
        "gs://b/p.json",
        "--data",
        "gs://b/prepared",
        "--teachers",
        seg,
        depth,
        "--out",
        f"{ROOT}/distill/student.trainjob",
    ]
    mtl = trainjob.request(
        _params("distill.mode=mtl"), "distill", IMAGE, "gs://b/p.json", "gs://b/prepared", f"{ROOT}/distill/student"
    )
    assert "--teachers" not in mtl.args
    with pytest.raises(ConfigError, match="gs:// pipeline root"):
        trainjob.request(p, "teacher", IMAGE, "gs://b/p", "gs://b/d", "/tmp/local/teacher", task="seg")
    with pytest.raises(ConfigError, match="needs the two teachers"):
        trainjob.request(p, "distill", IMAGE, "gs://b/p", "gs://b/d", f"{ROOT}/distill/student")


def test_launch_submits_through_the_sdk_and_waits():
    req = _teacher_request(_params(*GPU))
    with FakeTrainerApi(namespace="team-a") as api:
        name = trainjob.launch(req, poll_interval=1, timeout=30, client=api.client())
        posted = [r for r in api.requests if r["method"] == "POST"]
        assert name == req.name and len(posted) == 1
        assert posted[0]["path"] == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
        # What the SDK posted is exactly the manifest we build and test above.
        body = posted[0]["body"]
        expected = trainjob.manifest(req)
        assert body["spec"] == expected["spec"]
        assert body["metadata"]["name"] == expected["metadata"]["name"]
        assert body["metadata"]["labels"] == expected["metadata"]["labels"]
        assert api.reads[name] >= 2  # it waited for the job instead of returning at once
    with FakeTrainerApi(namespace="team-a") as api:
        # A retried KFP step re-attaches to the job it created before instead of failing on "already exists".
        assert trainjob.launch(req, poll_interval=1, timeout=30, client=api.client()) == req.name
        assert trainjob.launch(req, poll_interval=1, timeout=30, client=api.client()) == req.name
        assert len(api.jobs) == 1 and sum(r["method"] == "POST" for r in api.requests) == 2
    with FakeTrainerApi(namespace="team-a", outcome="Failed") as api:
        with pytest.raises(OutputError, match=f"TrainJob {req.name}: .*Failed"):
            trainjob.launch(req, poll_interval=1, timeout=30, client=api.client())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_like_a_trainer_node(job: dict, tmp) -> bool:
    """Run a TrainJob's node-0 container here, as the torch runtime would: its command and args with the PET_*
    variables of a one-node job, the job's env, and the GCS emulator."""
    t = job["spec"]["trainer"]
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in t.get("env", [])},
        "PET_NNODES": "1",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(_free_port()),
        "JOINTDISTILL_STAGE_DIR": str(tmp),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [os.path.join(os.path.dirname(sys.executable), t["command"][0]), *t["args"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    (tmp / "node-0.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode == 0


@pytest.mark.slow
def test_teacher_step_runs_as_a_two_process_job_through_gcs(gcs_emulator, prepared, tmp_path):
    """The KFP step's whole TrainJob path: params uploaded, the job created with the SDK and run (torchrun, 2
    processes, inputs downloaded once per node, output uploaded by rank 0), the output copied into the step's
    artifact folder."""
    make_bucket("runs")
    storage.upload_tree(prepared, f"{ROOT}/prepare/prepared")
    p = _params(
        "pipeline.trainjob.enabled=true",
        "pipeline.trainjob.procs_per_node=2",
        "pipeline.trainjob.poll_interval=1",
        "pipeline.trainjob.namespace=team-a",
        "teacher.epochs=1",
        "teacher.batch_size=4",
    )
    artifact = tmp_path / "artifact" / "teacher"
    with FakeTrainerApi(namespace="team-a", executor=lambda job: _run_like_a_trainer_node(job, tmp_path)) as api:
        report = trainjob.run_step(
            p,
            "teacher",
            IMAGE,
            {"data": f"{ROOT}/prepare/prepared"},
            f"{ROOT}/train-teacher/teacher",
            str(artifact),
            task="seg",
            client=api.client(),
        )
    log = (tmp_path / "node-0.log").read_text()
    assert report["task"] == "seg" and report["monitor"] == "miou", log
    assert {p.name for p in artifact.iterdir()} == {
        "dvclive",
        "lineage.json",
        "report.json",
        "metrics.json",
        "run.json",
        "model.pt",
    }
    assert json.loads((artifact / "report.json").read_text()) == report
    assert report["world_size"] == 2  # torchrun really started the two processes the job asks for
    # The params the job read are the step's (uploaded beside the output), not the image's params.yaml.
    assert json.loads(storage_read(f"{ROOT}/train-teacher/teacher.trainjob.params.json"))["teacher"]["epochs"] == 1
    # The single-process command cleans its local copies; this one was 2 processes: they stay in the stage dir.
    assert (tmp_path / "jointdistill-stage").is_dir()


def test_a_job_that_completes_without_its_output_fails_the_step(gcs_emulator, tmp_path):
    make_bucket("runs")
    p = _params(
        "pipeline.trainjob.enabled=true", "pipeline.trainjob.poll_interval=1", "pipeline.trainjob.namespace=team-a"
    )
    with FakeTrainerApi(namespace="team-a", executor=lambda job: True) as api:  # "succeeds", uploads nothing
        with pytest.raises(OutputError, match=r"completed but .*teacher-x.trainjob is incomplete"):
            trainjob.run_step(
                p,
                "teacher",
                IMAGE,
                {"data": f"{ROOT}/prepare/prepared"},
                f"{ROOT}/train-teacher/teacher-x",
                str(tmp_path / "artifact"),
                task="seg",
                client=api.client(),
            )
    assert not (tmp_path / "artifact").exists()


def storage_read(url: str) -> bytes:
    bucket, name = storage.parse_url(url)
    return storage._client().bucket(bucket).blob(name).download_as_bytes()


def test_staged_folders_round_trip_and_bad_urls(gcs_emulator, tmp_path):
    make_bucket("staging")
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.bin").write_bytes(os.urandom(3000))
    (src / "top.json").write_text("{}")
    assert storage.upload_tree(src, "gs://staging/run/out") == 2
    (src / "top.json").unlink()
    assert storage.upload_tree(src, "gs://staging/run/out") == 1  # the stale object is removed
    got = storage.download_tree("gs://staging/run/out", tmp_path / "dl")
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == ["a/b/x.bin"]
    assert (got / "a" / "b" / "x.bin").read_bytes() == (src / "a" / "b" / "x.bin").read_bytes()
    one = storage.download_tree("gs://staging/run/out/a/b/x.bin", tmp_path / "one.bin")
    assert one.read_bytes() == (src / "a" / "b" / "x.bin").read_bytes()
    with pytest.raises(DataError, match="no such object or folder"):
        storage.download_tree("gs://staging/run/missing", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(DataError, match="into a prefix"):
        storage.upload_tree(src, "gs://staging")


def test_cli_training_commands_take_gs_urls(gcs_emulator, prepared, tmp_path):
    """One process, no torchrun: the same command a job runs, with a bad input URL failing in one line."""
    make_bucket("cli-staging")
    storage.upload_tree(prepared, "gs://cli-staging/prepared")
    env = {**os.environ, "JOINTDISTILL_STAGE_DIR": str(tmp_path / "stage")}
    base = [
        sys.executable,
        "-m",
        "jointdistill",
        "train-teacher",
        "--task",
        "depth",
        "--params",
        str(REPO / "params.yaml"),
        *sum((["--set", s] for s in [*TINY, "teacher.epochs=1"]), []),
    ]
    ok = subprocess.run(
        [*base, "--data", "gs://cli-staging/prepared", "--out", "gs://cli-staging/teacher-depth"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    got = storage.download_tree("gs://cli-staging/teacher-depth", tmp_path / "teacher")
    assert (got / "model.pt").is_file() and json.loads((got / "report.json").read_text())["task"] == "depth"
    assert not any((tmp_path / "stage" / "jointdistill-stage").iterdir())  # local copies removed
    bad = subprocess.run(
        [*base, "--data", "gs://cli-staging/nothing-here", "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: gs://cli-staging/nothing")
    assert not (tmp_path / "out").exists()


def test_compiled_pipeline_launches_jobs(tmp_path):
    p = load_params(REPO / "params.yaml", [*GPU, "pipeline.node_selector={pool: gpu}"])
    path = compile_pipeline(tmp_path / "jointdistill.yaml", p, IMAGE)
    assert components.load_component_from_file(str(path)).name == "jointdistill"
    ir = yaml.safe_load(path.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    executors = ir["deploymentSpec"]["executors"]
    launchers = {n: t for n, t in tasks.items() if n.startswith(("train-teacher", "distill"))}
    assert sorted(launchers) == ["distill-job", "train-teacher-job", "train-teacher-job-2"]
    for task in launchers.values():
        assert task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == IMAGE
        container = executors[task["componentRef"]["name"].replace("comp-", "exec-")]["container"]
        assert container["image"] == IMAGE
        assert "trainjob.run_step" in " ".join(container["command"])
        res = container["resources"]
        assert res["cpuLimit"] == 1 and res["memoryLimit"] == 2 and "accelerator" not in res
    # The launcher pods are not placed on the GPU pool: the job's nodes are.
    platform = ir.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    assert not any("nodeSelector" in cfg for name, cfg in platform.items() if "job" in name)
    # The teachers' training step is still cached like the in-pod one; distill is not (params.yaml).
    assert "enableCache" not in tasks["distill-job"]["cachingOptions"]
    assert tasks["train-teacher-job"]["cachingOptions"]["enableCache"] is True


def test_cli_prints_the_trainjob_of_a_step():
    from typer.testing import CliRunner

    from jointdistill.cli import app

    r = CliRunner().invoke(
        app,
        [
            "pipeline",
            "trainjob",
            "distill",
            "--root",
            "gs://b/run/",
            "--image",
            IMAGE,
            "--params",
            str(REPO / "params.yaml"),
            "--set",
            "pipeline.trainjob.num_nodes=3",
            "--set",
            "distill.mode=full",
        ],
    )
    assert r.exit_code == 0, r.output
    job = models.TrainerV1alpha1TrainJob.from_dict(yaml.safe_load(r.output))
    assert job.spec.trainer.num_nodes == 3 and job.spec.trainer.image == IMAGE
    assert job.spec.trainer.args[-5:] == [
        "--teachers",
        "gs://b/run/teacher-seg",
        "gs://b/run/teacher-depth",
        "--out",
        "gs://b/run/distill.trainjob",
    ]
    # The default mtl student reads no teacher, so its job is not given them.
    mtl = CliRunner().invoke(
        app, ["pipeline", "trainjob", "distill", "--root", "gs://b/run/", "--params", str(REPO / "params.yaml")]
    )
    assert mtl.exit_code == 0, mtl.output
    args = models.TrainerV1alpha1TrainJob.from_dict(yaml.safe_load(mtl.output)).spec.trainer.args
    assert "--teachers" not in args and args[-2:] == ["--out", "gs://b/run/distill.trainjob"]
    bad = CliRunner().invoke(
        app, ["pipeline", "trainjob", "distill", "--root", "/local/run", "--params", str(REPO / "params.yaml")]
    )
    assert bad.exit_code == 2 and "gs:// pipeline root" in bad.output
