"""Hyperparameter tuning with Katib: a `kubeflow.org/v1beta1` Experiment whose trials train one student each.

Each trial is a Kubernetes Job running the project's image: it writes the run's params (carried in the Job's
environment, so a trial trains exactly what the user's params.yaml and ``--set`` say), trains a student with
``jointdistill distill --set KEY=<the trial's value> …`` from given prepared data and teachers (local paths or
gs:// URLs), and prints one line ``val_<metric>=<value>`` for Katib's StdOut metrics collector. The objective is a
**val** metric of the student's selected weights, never test: tuning reads val only.

The Experiment is built with Katib's own model classes (``kubeflow-katib-api``, which needs only pydantic). The
``kubeflow-katib`` SDK is not used: it pins protobuf < 5 and kubeflow-training 1.9, which conflict with kfp 2.17's
protobuf 6. Submission goes through the ``kubernetes`` client's CustomObjectsApi, as the SDK itself does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jointdistill.config import Params, params_from_dict, parse_override
from jointdistill.distill.knobs import refuse_unread
from jointdistill.errors import ConfigError, OutputError

GROUP, VERSION, PLURAL = "kubeflow.org", "v1beta1", "experiments"
# The student's val metrics a trial can report, and the direction Katib optimises each in.
OBJECTIVES = {
    "mt_score": "maximize",
    "miou": "maximize",
    "delta1": "maximize",
    "abs_err": "minimize",
    "rel_err": "minimize",
}
ALGORITHMS = ("random", "grid", "tpe", "bayesianoptimization", "cmaes")
TYPES = ("double", "int", "categorical", "discrete")
CONTAINER = "trial"
# Katib's StdOut collector's default metrics format: `name=value` lines.
METRIC_LINE = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")


@dataclass(frozen=True)
class SearchParam:
    """One searched params key: ``double``/``int`` over [low, high] (optional step), or ``categorical``/``discrete``
    over listed values."""

    key: str
    type: str
    low: Any = None
    high: Any = None
    step: Any = None
    values: tuple = ()

    @property
    def name(self) -> str:
        """The Katib parameter's name: the key with dots as underscores (``distill.alpha`` → ``distill_alpha``)."""
        return self.key.replace(".", "_")

    def feasible_space(self) -> dict:
        if self.values:
            return {"list": [str(v) for v in self.values]}
        space = {"min": str(self.low), "max": str(self.high)}
        return space | ({"step": str(self.step)} if self.step is not None else {})


def parse_space(items: list[str], params: Params) -> list[SearchParam]:
    """``KEY=double:LOW:HIGH[:STEP]``, ``KEY=int:LOW:HIGH[:STEP]``, ``KEY=categorical:A,B`` or ``KEY=discrete:1,2,4``.
    Every bound and value must be one that params accept (checked now, not in the cluster)."""
    if not items:
        raise ConfigError("--space: give at least one, e.g. --space distill.alpha=double:0:2")
    out: list[SearchParam] = []
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or not key or kind not in TYPES or not rest:
            raise ConfigError(
                f"--space {item!r}: expected KEY=TYPE:..., TYPE one of {', '.join(TYPES)}, "
                "e.g. distill.alpha=double:0:2 or distill.feedback=categorical:progress,deficit"
            )
        if kind in ("double", "int"):
            bounds = [parse_override(f"{key}={b}")[1] for b in rest.split(":")]
            if len(bounds) not in (2, 3) or not all(isinstance(b, int | float) for b in bounds):
                raise ConfigError(f"--space {item!r}: {kind} takes LOW:HIGH or LOW:HIGH:STEP numbers")
            if kind == "int" and not all(isinstance(b, int) for b in bounds):
                raise ConfigError(f"--space {item!r}: int bounds must be integers")
            if bounds[0] >= bounds[1]:
                raise ConfigError(f"--space {item!r}: LOW must be below HIGH")
            p = SearchParam(key, kind, bounds[0], bounds[1], bounds[2] if len(bounds) == 3 else None)
            candidates = bounds[:2]
        else:
            values = tuple(parse_override(f"{key}={v}")[1] for v in rest.split(",") if v.strip())
            if len(values) < 2:
                raise ConfigError(f"--space {item!r}: list at least two values")
            if kind == "discrete" and not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"--space {item!r}: discrete values are numbers (categorical takes words)")
            p = SearchParam(key, kind, values=values)
            candidates = list(values)
        if key in {q.key for q in out}:
            raise ConfigError(f"--space: {key} is given twice")
        for value in candidates:
            _check(params, key, value)
        out.append(p)
    modes = next((q.values for q in out if q.key == "distill.mode"), (params.distill.mode,))
    points = [params.model_copy(update={"distill": params.distill.model_copy(update={"mode": m})}) for m in modes]
    refuse_unread(points, [q.key for q in out], "--space")
    return out


def _check(params: Params, key: str, value: Any) -> None:
    data = params.model_dump(mode="json")
    node = data
    *path, last = key.split(".")
    for part in path:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"--space: unknown params key {key!r}")
        node = node[part]
    if last not in node:
        raise ConfigError(f"--space: unknown params key {key!r}")
    if key.split(".")[0] not in ("seed", "augment", "student", "distill"):
        raise ConfigError(f"--space {key}: a trial trains a student; it reads seed, augment.*, student.* and distill.*")
    node[last] = value
    params_from_dict(data, source=f"--space {key}={value}")


def trial_script(params: Params, space: list[SearchParam], data: str, teachers: tuple[str, str], metric: str) -> str:
    """The trial container's shell script: the run's params from the environment, one student with the trial's
    values, then the objective line. Katib replaces each ``${trialParameters.NAME}`` before the Job starts."""
    sets = " ".join(f"--set {shlex.quote(p.key)}=${{trialParameters.{p.name}}}" for p in space)
    return "\n".join(
        [
            "set -eu",
            'out="${TMPDIR:-/tmp}/jointdistill-trial"',
            'printf "%s" "$JOINTDISTILL_PARAMS" > "$out.params.yaml"',
            f'jointdistill distill --params "$out.params.yaml" --data {shlex.quote(data)} '
            f'--teachers {shlex.quote(teachers[0])} {shlex.quote(teachers[1])} --out "$out" {sets}',
            f'jointdistill objective "$out" --metric {metric}',
        ]
    )


def experiment(
    params: Params,
    space: list[SearchParam],
    *,
    name: str,
    data: str,
    teachers: tuple[str, str],
    metric: str = "mt_score",
    image: str,
    namespace: str | None = None,
    algorithm: str = "random",
    max_trials: int = 12,
    parallel_trials: int = 3,
    max_failed_trials: int = 3,
) -> dict:
    """The Katib Experiment (a plain dict, as the API server stores it), built and validated with Katib's model
    classes. A trial is the pipeline's distill step run alone: its pod asks for ``params.pipeline.distill``'s
    resources, on the pipeline's node selector and tolerations."""
    from kubeflow_katib_api import models as k

    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm {algorithm!r}: choose from {', '.join(ALGORITHMS)}")
    if not 1 <= parallel_trials <= max_trials or max_failed_trials < 0:
        raise ConfigError(f"trials: need 1 <= parallel ({parallel_trials}) <= max ({max_trials}) and max failed >= 0")
    if metric not in OBJECTIVES:
        raise ConfigError(f"--metric {metric!r}: choose from {', '.join(OBJECTIVES)} (val metrics of the student)")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ConfigError(f"--name {name!r}: a Kubernetes name (lowercase letters, digits and '-', ≤ 63)")
    step = params.pipeline.distill
    resources: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for field, value in (("cpu", step.cpu), ("memory", step.memory)):
        if value:
            resources["requests"][field] = resources["limits"][field] = value
    if step.accelerator_limit and step.accelerator_type:
        resources["limits"][step.accelerator_type] = str(step.accelerator_limit)
    run_params = yaml.safe_dump(params.model_dump(mode="json", exclude={"pipeline"}), sort_keys=False)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": CONTAINER,
                            "image": image,
                            "command": ["/bin/sh", "-c", trial_script(params, space, data, teachers, metric)],
                            "env": [{"name": "JOINTDISTILL_PARAMS", "value": run_params}],
                            "resources": {k_: v for k_, v in resources.items() if v},
                        }
                    ],
                    **({"nodeSelector": dict(params.pipeline.node_selector)} if params.pipeline.node_selector else {}),
                    **(
                        {"tolerations": [t.model_dump(exclude_none=True) for t in params.pipeline.tolerations]}
                        if params.pipeline.tolerations
                        else {}
                    ),
                },
            },
        },
    }
    spec = k.V1beta1ExperimentSpec(
        objective=k.V1beta1ObjectiveSpec(type=OBJECTIVES[metric], objective_metric_name=f"val_{metric}"),
        algorithm=k.V1beta1AlgorithmSpec(algorithm_name=algorithm),
        parallel_trial_count=parallel_trials,
        max_trial_count=max_trials,
        max_failed_trial_count=max_failed_trials,
        metrics_collector_spec=k.V1beta1MetricsCollectorSpec(collector=k.V1beta1CollectorSpec(kind="StdOut")),
        parameters=[
            k.V1beta1ParameterSpec(
                name=p.name, parameter_type=p.type, feasible_space=k.V1beta1FeasibleSpace(**p.feasible_space())
            )
            for p in space
        ],
        trial_template=k.V1beta1TrialTemplate(
            primary_container_name=CONTAINER,
            trial_parameters=[
                k.V1beta1TrialParameterSpec(name=p.name, description=f"params key {p.key}", reference=p.name)
                for p in space
            ],
            trial_spec=job,
        ),
    )
    meta = k.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
        name=name,
        namespace=namespace,
        labels={"app.kubernetes.io/part-of": "jointdistill"},
    )
    body = k.V1beta1Experiment(api_version=f"{GROUP}/{VERSION}", kind="Experiment", metadata=meta, spec=spec)
    return body.to_dict()


def objective_line(folder: str | Path, metric: str = "mt_score") -> str:
    """``val_<metric>=<value>`` of a distill output's selected weights (its report.json's val metrics)."""
    if metric not in OBJECTIVES:
        raise ConfigError(f"--metric {metric!r}: choose from {', '.join(OBJECTIVES)}")
    report = Path(folder) / "report.json"
    try:
        val = json.loads(report.read_text())["val"]
    except (OSError, ValueError, KeyError) as exc:
        raise OutputError(f"{report}: not a finished distill output ({exc.__class__.__name__})") from None
    if val.get(metric) is None:
        raise OutputError(f"{report}: its val metrics have no {metric}")
    return f"val_{metric}={float(val[metric]):.6f}"


def _api(client_configuration=None):
    from kubernetes import client, config

    if client_configuration is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=_kubeconfig())
        return client.CustomObjectsApi()
    return client.CustomObjectsApi(client.ApiClient(client_configuration))


def _kubeconfig() -> str | None:
    # Read now: the kubernetes client reads $KUBECONFIG once, when it is first imported.
    return os.environ.get("KUBECONFIG") or None


def current_namespace() -> str:
    """The pod's own namespace in a cluster, else the kubeconfig's current context's, else ``default``."""
    sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if sa.exists():
        return sa.read_text().strip()
    from kubernetes import config

    try:
        _, current = config.list_kube_config_contexts(config_file=_kubeconfig())
    except (config.ConfigException, OSError):
        return "default"
    return current.get("context", {}).get("namespace") or "default"


def submit(body: dict, namespace: str, client_configuration=None) -> dict:
    """Create the Experiment in ``namespace``; returns what the API server stored."""
    from kubernetes.client.exceptions import ApiException

    api = _api(client_configuration)
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except ApiException as exc:
        raise OutputError(
            f"Katib Experiment {body['metadata']['name']}: the API server said {exc.status} {exc.reason}"
        ) from None


def wait(
    name: str, namespace: str, client_configuration=None, poll_interval: float = 30, timeout: float = 7 * 24 * 3600
) -> dict:
    """Poll the Experiment until it has succeeded (returns it) or failed (OutputError); its optimal trial is in
    ``status.currentOptimalTrial``."""
    api = _api(client_configuration)
    deadline = time.monotonic() + timeout
    while True:
        exp = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        conditions = {c["type"]: c for c in exp.get("status", {}).get("conditions", []) if c.get("status") == "True"}
        if "Succeeded" in conditions:
            return exp
        if "Failed" in conditions:
            raise OutputError(f"Katib Experiment {name} failed: {conditions['Failed'].get('message', '')}")
        if time.monotonic() > deadline:
            raise OutputError(f"Katib Experiment {name}: not finished after {timeout:.0f} s")
        time.sleep(poll_interval)


def best(exp: dict) -> dict:
    """{params key: value} and the objective of the Experiment's optimal trial."""
    optimal = exp.get("status", {}).get("currentOptimalTrial", {})
    names = {p["name"]: p["feasibleSpace"] for p in exp["spec"]["parameters"]}
    keys = {
        t["name"]: t["description"].removeprefix("params key ") for t in exp["spec"]["trialTemplate"]["trialParameters"]
    }
    values = {
        keys.get(a["name"], a["name"]): a["value"]
        for a in optimal.get("parameterAssignments", [])
        if a["name"] in names
    }
    metrics = {m["name"]: m.get("latest") for m in optimal.get("observation", {}).get("metrics", [])}
    return {"parameters": values, "metrics": metrics, "trial": optimal.get("bestTrialName")}
