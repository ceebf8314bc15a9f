"""A local HTTP server speaking the part of the Kubernetes API that the Kubeflow SDK's TrainerClient (Kubernetes
backend) uses to create a TrainJob and follow it: the Trainer's public ConfigMap, a ClusterTrainingRuntime
(`torch-distributed`), TrainJob create/get, and Pod lists. It records every request. A created job reports the
condition ``outcome`` ("Complete" or "Failed") from its second read on, so a caller must actually wait; with
``executor``, the job is instead run by that callable (given the TrainJob object, returning True on success)
and reports its result once it has finished."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

GROUP = "/apis/trainer.kubeflow.org/v1alpha1"


class JsonHandler(BaseHTTPRequestHandler):
    """What both fake API servers answer with: JSON bodies, and Kubernetes `Status` objects for errors."""

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}
        self._reply(code, {**body, "message": message})


def torch_runtime(name: str) -> dict:
    """The shape of Kubeflow Trainer's torch-distributed ClusterTrainingRuntime (what the SDK reads of it)."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "replicas": 1,
                            "template": {
                                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                "spec": {
                                    "template": {
                                        "spec": {
                                            "containers": [
                                                {
                                                    "name": "node",
                                                    "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
                                                    "command": ["/bin/bash", "-c", "echo"],
                                                }
                                            ]
                                        }
                                    }
                                },
                            },
                        }
                    ]
                }
            },
        },
    }


class FakeTrainerApi:
    def __init__(self, namespace: str = "team-a", outcome: str = "Complete", executor=None):
        self.namespace = namespace
        self.outcome = outcome
        self.executor = executor
        self.results: dict[str, str] = {}
        self.requests: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        api = self

        class Handler(JsonHandler):
            def _not_found(self, what: str) -> None:
                self._status(404, "NotFound", f"{what} not found")

            def do_GET(self):
                path = urlparse(self.path).path
                api.requests.append({"method": "GET", "path": path})
                ns = f"/namespaces/{api.namespace}"
                if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
                    return self._reply(
                        200,
                        {
                            "kind": "ConfigMap",
                            "apiVersion": "v1",
                            "metadata": {"name": "kubeflow-trainer-public"},
                            "data": {"kubeflow_trainer_version": "v2.1.0"},
                        },
                    )
                if path.startswith(f"{GROUP}/clustertrainingruntimes/"):
                    return self._reply(200, torch_runtime(path.rsplit("/", 1)[1]))
                if path.startswith(f"{GROUP}{ns}/trainingruntimes/"):
                    return self._not_found("trainingruntime")
                if path.startswith(f"{GROUP}{ns}/trainjobs/"):
                    name = path.rsplit("/", 1)[1]
                    job = api.read_job(name)
                    return self._reply(200, job) if job else self._not_found(f"trainjob {name}")
                if path == f"/api/v1{ns}/pods":
                    return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})
                return self._not_found(path)

            def do_POST(self):
                path = urlparse(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                api.requests.append({"method": "POST", "path": path, "body": body})
                if path == f"{GROUP}/namespaces/{api.namespace}/trainjobs":
                    if body["metadata"]["name"] in api.jobs:
                        return self._status(
                            409, "AlreadyExists", f"trainjobs {body['metadata']['name']} already exists"
                        )
                    body["metadata"].update(namespace=api.namespace, creationTimestamp="2026-11-26T00:00:00Z")
                    api.jobs[body["metadata"]["name"]] = body
                    if api.executor:
                        threading.Thread(target=api._execute, args=(body,), daemon=True).start()
                    return self._reply(201, body)
                return self._not_found(path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def read_job(self, name: str) -> dict | None:
        """The job as the API server returns it (None if there is none): from its second read on, it carries the
        outcome's condition (the executor's result when there is one)."""
        if name not in self.jobs:
            return None
        self.reads[name] = self.reads.get(name, 0) + 1
        job = json.loads(json.dumps(self.jobs[name]))
        outcome = self.results.get(name) if self.executor else self.outcome
        if self.reads[name] >= 2 and outcome:
            job["status"] = {
                "conditions": [
                    {
                        "type": outcome,
                        "status": "True",
                        "reason": outcome,
                        "message": "",
                        "lastTransitionTime": "2026-11-26T00:00:00Z",
                    }
                ]
            }
        return job

    def _execute(self, job: dict) -> None:
        ok = False
        try:
            ok = self.executor(job)
        finally:
            self.results[job["metadata"]["name"]] = "Complete" if ok else "Failed"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def client(self):
        """A real TrainerClient (Kubernetes backend) pointed at this server."""
        from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
        from kubernetes import client

        conf = client.Configuration()
        conf.host = self.url
        return TrainerClient(KubernetesBackendConfig(namespace=self.namespace, client_configuration=conf))


KATIB = "/apis/kubeflow.org/v1beta1"


class FakeKatibApi:
    """The part of the Kubernetes API that Katib's Experiments live in: create (409 when it exists) and get,
    stored as posted. A stored Experiment reports ``Created`` on its first read, ``Running`` on its second, and
    from its third on the ``outcome`` condition (``Succeeded`` or ``Failed``), with an optimal trial that takes
    each parameter's first feasible value and reports ``objective``; so a caller must actually poll."""

    def __init__(self, namespace: str = "team-a", outcome: str = "Succeeded", objective: float = 0.5):
        self.namespace, self.outcome, self.objective = namespace, outcome, objective
        self.experiments: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        self.requests: list[dict] = []
        api = self
        base = f"{KATIB}/namespaces/{namespace}/experiments"

        class Handler(JsonHandler):
            def do_GET(self):
                path = urlparse(self.path).path
                api.requests.append({"method": "GET", "path": path})
                name = path.rsplit("/", 1)[1]
                if path.startswith(base + "/") and name in api.experiments:
                    return self._reply(200, api.read(name))
                return self._status(404, "NotFound", f"{path} not found")

            def do_POST(self):
                path = urlparse(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                api.requests.append({"method": "POST", "path": path, "body": body})
                if path != base:
                    return self._status(404, "NotFound", f"{path} not found")
                name = body["metadata"]["name"]
                if name in api.experiments:
                    return self._status(409, "AlreadyExists", f"experiments.kubeflow.org {name!r} already exists")
                body["metadata"].update(namespace=api.namespace, uid="0000", creationTimestamp="2026-12-07T00:00:00Z")
                api.experiments[name] = body
                return self._reply(201, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def read(self, name: str) -> dict:
        self.reads[name] = self.reads.get(name, 0) + 1
        exp = json.loads(json.dumps(self.experiments[name]))
        kind = {1: "Created", 2: "Running"}.get(self.reads[name], self.outcome)
        exp["status"] = {"conditions": [{"type": kind, "status": "True", "reason": f"Experiment{kind}", "message": ""}]}
        if kind == "Succeeded":
            first = {
                p["name"]: (p["feasibleSpace"].get("list") or [p["feasibleSpace"].get("min")])[0]
                for p in exp["spec"]["parameters"]
            }
            metric = exp["spec"]["objective"]["objectiveMetricName"]
            exp["status"]["currentOptimalTrial"] = {
                "bestTrialName": f"{name}-abc123",
                "parameterAssignments": [{"name": k, "value": v} for k, v in first.items()],
                "observation": {"metrics": [{"name": metric, "latest": str(self.objective)}]},
            }
        return exp

    def kubeconfig(self, path) -> None:
        """A kubeconfig whose current context is this server and its namespace."""
        import yaml

        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "t"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}
                    ],
                    "current-context": "fake",
                }
            )
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
