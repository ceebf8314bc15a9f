"""A local HTTP server speaking the part of the Kubeflow Pipelines v2beta1 REST API that kfp.Client uses to
start a run from a pipeline package. It records every request (method, path, query, headers, JSON body)."""

import json
import threading
import uuid
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from .k8s_api import JsonHandler


class FakeKfpApi:
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.fail_runs_with: int | None = None
        api = self

        class Handler(JsonHandler):
            def _record(self, method: str) -> tuple[str, dict, dict]:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": query,
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                return url.path, query, body

            def do_GET(self):
                path, query, _ = self._record("GET")
                if path == "/apis/v2beta1/healthz":
                    return self._reply(200, {"multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    wanted = json.loads(query.get("filter") or "{}")
                    names = [p.get("stringValue", p.get("string_value")) for p in wanted.get("predicates", [])]
                    found = [e for e in api.experiments.values() if not names or e["display_name"] in names]
                    return self._reply(200, {"experiments": found, "total_size": len(found)})
                return self._reply(404, {"error": f"no route {path}"})

            def do_POST(self):
                path, _, body = self._record("POST")
                if path == "/apis/v2beta1/experiments":
                    exp = {
                        "experiment_id": str(uuid.uuid4()),
                        "display_name": body["display_name"],
                        "storage_state": "AVAILABLE",
                    }
                    api.experiments[exp["experiment_id"]] = exp
                    return self._reply(200, exp)
                if path == "/apis/v2beta1/runs":
                    if api.fail_runs_with:
                        return self._reply(
                            api.fail_runs_with, {"error": "refused by the fake server", "code": 3, "message": "refused"}
                        )
                    run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING"}
                    api.runs[run["run_id"]] = run
                    return self._reply(200, run)
                return self._reply(404, {"error": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
