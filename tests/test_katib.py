"""`jointdistill tune`: a Katib Experiment built with Katib's model classes, stored by a local Kubernetes API
server and polled there, and a trial's command run here at tiny size, its objective line parsed as Katib's StdOut
collector parses it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubeflow_katib_api.models import V1beta1Experiment
from typer.testing import CliRunner

from jointdistill.cli import app
from jointdistill.cloud import katib
from jointdistill.config import load_params, params_from_dict
from jointdistill.errors import ConfigError

from .conftest import REPO, TINY
from .k8s_api import FakeKatibApi

SPACE = ["distill.alpha=double:0:2", "distill.top_k=int:5:20:5", "distill.feedback=categorical:progress,deficit"]
FULL = ["distill.mode=full"]  # the mode that reads every key of SPACE (the default mtl reads none of them)


def _experiment(*extra, space=SPACE, **kw):
    p = load_params(REPO / "params.yaml", [*FULL, *extra])
    return p, katib.experiment(
        p,
        katib.parse_space(space, p),
        name="tune-alpha",
        data="gs://b/run/prepared",
        teachers=("gs://b/run/seg", "gs://b/run/depth"),
        image="registry.example/jointdistill:1",
        **kw,
    )


def test_the_experiment_is_katibs_own_model_and_reads_val_only():
    p, body = _experiment("pipeline.distill.accelerator_type=nvidia.com/gpu", "pipeline.distill.accelerator_limit=1")
    assert V1beta1Experiment.from_dict(body).to_dict() == body  # the official classes accept it as it is
    assert body["apiVersion"] == "kubeflow.org/v1beta1" and body["kind"] == "Experiment"
    spec = body["spec"]
    assert spec["objective"] == {"type": "maximize", "objectiveMetricName": "val_mt_score"}
    assert spec["metricsCollectorSpec"]["collector"]["kind"] == "StdOut"
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (12, 3, 3)
    assert spec["parameters"] == [
        {"name": "distill_alpha", "parameterType": "double", "feasibleSpace": {"min": "0", "max": "2"}},
        {"name": "distill_top_k", "parameterType": "int", "feasibleSpace": {"min": "5", "max": "20", "step": "5"}},
        {
            "name": "distill_feedback",
            "parameterType": "categorical",
            "feasibleSpace": {"list": ["progress", "deficit"]},
        },
    ]
    template = spec["trialTemplate"]
    assert [t["reference"] for t in template["trialParameters"]] == [
        "distill_alpha",
        "distill_top_k",
        "distill_feedback",
    ]
    (container,) = template["trialSpec"]["spec"]["template"]["spec"]["containers"]
    assert (
        container["name"] == template["primaryContainerName"]
        and container["image"] == "registry.example/jointdistill:1"
    )
    # A trial is the pipeline's distill step run alone: its resources.
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16G"},
        "limits": {"cpu": "4", "memory": "16G", "nvidia.com/gpu": "1"},
    }
    script = container["command"][2]
    for key, name in (("distill.alpha", "distill_alpha"), ("distill.feedback", "distill_feedback")):
        assert f"--set {key}=${{trialParameters.{name}}}" in script
    assert "gs://b/run/prepared" in script and "jointdistill objective" in script and "test" not in script
    # The trial trains exactly the run's params: they travel in its environment.
    (env,) = container["env"]
    assert params_from_dict(yaml.safe_load(env["value"])).digest() == p.digest()
    _, lower = _experiment(metric="abs_err", algorithm="tpe", max_trials=4, parallel_trials=2)
    assert lower["spec"]["objective"]["type"] == "minimize" and lower["spec"]["algorithm"]["algorithmName"] == "tpe"


@pytest.mark.parametrize(
    "space,match",
    [
        (["distill.alfa=double:0:2"], "unknown params key"),
        (["distill.alpha=double:2:0"], "LOW must be below HIGH"),
        (["distill.alpha=double:-1:2"], "distill.alpha"),  # alpha ≥ 0: params refuse the bound, before any trial
        (["distill.top_k=int:5:7.5"], "int bounds must be integers"),
        (["distill.feedback=categorical:progress"], "at least two values"),
        (["distill.feedback=categorical:progress,sideways"], "distill.feedback"),
        (["distill.alpha=uniform:0:1"], "TYPE one of"),
        (["prepare.height=int:64:128"], "a trial trains a student"),
        (["distill.alpha=double:0:1", "distill.alpha=double:1:2"], "given twice"),
    ],
)
def test_a_bad_space_is_refused_before_anything_runs(space, match):
    with pytest.raises(Exception, match=match):
        katib.parse_space(space, load_params(REPO / "params.yaml", FULL))


def test_a_space_over_keys_the_mode_never_reads_is_refused():
    """Tuning ω's α under the default mtl would train the same student in every trial: refused, naming the keys;
    with the mode in the space, a key one of its modes reads is fine."""
    mtl = load_params(REPO / "params.yaml", ["distill.mode=mtl"])
    with pytest.raises(ConfigError, match=r"distill.alpha, distill.top_k are not read in distill.mode mtl"):
        katib.parse_space([*SPACE[:2], "distill.lambda_depth=double:0.5:2"], mtl)
    with pytest.raises(ConfigError, match="distill.top_k is not read in distill.mode static_kd"):
        katib.parse_space(["distill.top_k=int:5:20:5"], load_params(REPO / "params.yaml", ["distill.mode=static_kd"]))
    assert len(katib.parse_space(["distill.lambda_depth=double:0.5:2"], mtl)) == 1  # every mode reads it
    assert len(katib.parse_space([SPACE[0], "distill.mode=categorical:mtl,adaptive"], mtl)) == 2


def test_cli_writes_submits_and_polls_the_experiment(tmp_path, monkeypatch):
    args = [
        "tune",
        *[a for s in SPACE[:2] for a in ("--space", s)],
        "--data",
        "gs://b/run/prepared",
        "--teachers",
        "gs://b/run/seg",
        "gs://b/run/depth",
        "--name",
        "tune-alpha",
        "--params",
        str(REPO / "params.yaml"),
        "--set",
        "distill.mode=full",
        "--out",
        str(tmp_path / "experiment.yaml"),
    ]
    with FakeKatibApi(namespace="team-a", objective=0.61) as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        r = CliRunner().invoke(app, [*args, "--submit", "--wait", "--poll-interval", "0.05"])
        assert r.exit_code == 0, r.output
        (post,) = [q for q in api.requests if q["method"] == "POST"]
        assert post["path"] == "/apis/kubeflow.org/v1beta1/namespaces/team-a/experiments"
        written = yaml.safe_load((tmp_path / "experiment.yaml").read_text())
        assert post["body"]["spec"] == written["spec"] and api.experiments["tune-alpha"]["spec"] == written["spec"]
        assert api.reads["tune-alpha"] == 3  # Created, Running, Succeeded: it polled until the end
        assert '"distill.alpha": "0"' in r.output and '"val_mt_score": "0.61"' in r.output
        # Submitting the same name again is one clear error.
        again = CliRunner().invoke(app, [*args, "--submit"])
        assert again.exit_code != 0 and "409" in again.output
    with FakeKatibApi(namespace="team-a", outcome="Failed") as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        r = CliRunner().invoke(app, [*args, "--submit", "--wait", "--poll-interval", "0.05"])
        assert r.exit_code != 0 and "tune-alpha failed" in r.output


def test_a_trial_runs_here_and_prints_the_line_katib_parses(prepared, tiny_teachers, tmp_path):
    """The trial's own script, with Katib's substitution done by hand, against local data and teachers."""
    extra = [*TINY, "distill.mode=static_kd", "distill.epochs=1", "distill.batch_size=4", "distill.probe_images=2"]
    p = load_params(REPO / "params.yaml", extra)
    body = katib.experiment(
        p,
        katib.parse_space(["distill.lambda_kd=double:0.5:2"], p),
        name="tiny",
        data=str(prepared),
        teachers=(str(tiny_teachers[0]), str(tiny_teachers[1])),
        image="unused",
    )
    (container,) = body["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"]
    script = container["command"][2].replace("${trialParameters.distill_lambda_kd}", "0.75")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        **{e["name"]: e["value"] for e in container["env"]},
    }
    proc = subprocess.run([*container["command"][:2], script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [m.groups()[:2] for m in map(katib.METRIC_LINE.fullmatch, proc.stdout.splitlines()) if m]
    assert [name for name, _ in lines] == ["val_mt_score"]
    report = yaml.safe_load((tmp_path / "jointdistill-trial" / "report.json").read_text())
    assert float(lines[0][1]) == pytest.approx(report["val"]["mt_score"], abs=1e-6)
    # It trained the run's params with the trial's value.
    trial = load_params(tmp_path / "jointdistill-trial.params.yaml", ["distill.lambda_kd=0.75"])
    assert trial.digest() == load_params(REPO / "params.yaml", [*extra, "distill.lambda_kd=0.75"]).digest()
    assert report["params_digest"] == trial.digest("distill") != p.digest("distill")
    missing = CliRunner().invoke(app, ["objective", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "not a finished distill output" in missing.output
