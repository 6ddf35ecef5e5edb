"""``coreg pipeline submit`` and ``schedule`` against a loopback stand-in of the KFP v2beta1 REST API.

A real Kubeflow Pipelines server needs a Kubernetes cluster (Argo, MySQL, object store),
which cannot run on this machine. The stand-in below is a plain ``http.server`` that answers
the few endpoints ``kfp.Client`` calls (experiments, runs, recurring runs) and records every
request, so the tests check what coreg really sends over the wire: the compiled pipeline
spec, the run parameters, the 6-field cron schedule and caching switched off.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import urlparse

import pytest
from servers import free_port

from coreg import pipeline_cli
from coreg.errors import CoregError


class KfpStandIn(BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, str, dict]]] = []
    runs: ClassVar[dict[str, dict]] = {}

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        self.requests.append(("GET", self.path, {}))
        if path.startswith("/apis/v2beta1/runs/"):
            run_id = path.rsplit("/", 1)[-1]
            return self._reply({**self.runs.get(run_id, {}), "run_id": run_id, "state": "SUCCEEDED"})
        if path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        if path == "/apis/v2beta1/healthz":
            return self._reply({"multi_user": False})
        return self._reply({"error": f"not found: {path}"}, 404)

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.requests.append(("POST", path, body))
        if path == "/apis/v2beta1/experiments":
            return self._reply({**body, "experiment_id": "exp-1"})
        if path == "/apis/v2beta1/runs":
            run_id = f"run-{len(self.runs) + 1}"
            self.runs[run_id] = body
            return self._reply({**body, "run_id": run_id, "state": "PENDING"})
        if path == "/apis/v2beta1/recurringruns":
            return self._reply({**body, "recurring_run_id": "rr-1", "status": "ENABLED"})
        return self._reply({"error": f"not found: {path}"}, 404)


@pytest.fixture
def kfp_api():
    KfpStandIn.requests, KfpStandIn.runs = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), KfpStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="coreg")
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline_cli.register(sub)
    return parser.parse_args(list(argv))


def _spec(body: dict) -> dict:
    """The PipelineSpec inside a request (kfp sends {pipeline_spec, platform_spec} when there is one)."""
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def _posted(path: str) -> list[dict]:
    return [body for method, p, body in KfpStandIn.requests if method == "POST" and p == path]


def test_submit_sends_the_compiled_pipeline_and_waits(kfp_api, tmp_path):
    out = tmp_path / "run.json"
    args = _parse("pipeline", "submit", "--host", kfp_api, "--set", "train.epochs=30", "--run-name", "nightly",
                  "--tracking-uri", "http://mlflow.mlflow:5000", "--storage-uri", "s3://bucket/coreg",
                  "--service-account", "coreg-pipeline-runner", "--wait", "--timeout", "30", "--out", str(out))
    assert pipeline_cli.dispatch(args) == out
    summary = json.loads(out.read_text())
    assert summary["run_id"] == "run-1" and summary["state"] == "SUCCEEDED"
    (run,) = _posted("/apis/v2beta1/runs")
    assert run["display_name"] == "nightly"
    assert run["service_account"] == "coreg-pipeline-runner" == summary["service_account"]
    assert _spec(run)["pipelineInfo"]["name"] == "coreg"
    assert "exec-train" in run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"]
    params = run["runtime_config"]["parameters"]
    assert params["overrides"] == ["train.epochs=30"]
    assert params["tracking_uri"] == "http://mlflow.mlflow:5000"
    assert params["storage_uri"] == "s3://bucket/coreg"
    assert "train:" in params["config_yaml"]
    assert _posted("/apis/v2beta1/experiments")[0]["display_name"] == "coreg"


def test_schedule_creates_a_recurring_run_without_caching(kfp_api, tmp_path):
    out = tmp_path / "schedule.json"
    args = _parse("pipeline", "schedule", "--host", kfp_api, "--cron", "0 0 3 * * 1", "--name", "weekly",
                  "--no-gpu", "--out", str(out))
    assert pipeline_cli.dispatch(args) == out
    assert json.loads(out.read_text())["recurring_run_id"] == "rr-1"
    (job,) = _posted("/apis/v2beta1/recurringruns")
    assert job["display_name"] == "weekly"
    assert not job.get("service_account"), "without --service-account KFP's default account runs the pods"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert job["max_concurrency"] == "1" or job["max_concurrency"] == 1
    assert job["no_catchup"] is True
    assert job["experiment_id"] == "exp-1"
    tasks = _spec(job)["root"]["dag"]["tasks"]
    assert all(t.get("cachingOptions", {}).get("enableCache", False) is False for t in tasks.values())


def test_schedule_refuses_a_five_field_cron(kfp_api):
    with pytest.raises(CoregError, match="6 fields"):
        pipeline_cli.dispatch(_parse("pipeline", "schedule", "--host", kfp_api, "--cron", "0 3 * * 1"))


def test_unreachable_kfp_is_one_line_error():
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CoregError, match="KFP at") as err:
        pipeline_cli.dispatch(_parse("pipeline", "submit", "--host", host))
    assert "\n" not in str(err.value)


def test_schedule_runs_under_the_given_service_account(kfp_api, tmp_path):
    args = _parse("pipeline", "schedule", "--host", kfp_api, "--cron", "0 0 3 * * 1", "--no-gpu",
                  "--service-account", "coreg-pipeline-runner", "--out", str(tmp_path / "s.json"))
    pipeline_cli.dispatch(args)
    (job,) = _posted("/apis/v2beta1/recurringruns")
    assert job["service_account"] == "coreg-pipeline-runner"
