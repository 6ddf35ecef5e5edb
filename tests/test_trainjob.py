"""Multi-node training on a Kubeflow Trainer TrainJob (coreg/trainjob.py, components/trainjob).

No Kubernetes cluster (and no Kubeflow Trainer) can run here, so nothing in this file starts
real training pods. What is tested:

* rendering: the TrainJob object (apiVersion, runtimeRef, numNodes, numProcPerNode,
  resourcesPerNode with GPUs, the node script running ``torchrun ... coreg train``, the run
  config in the env, secrets, labels, pod security) and the validation of bad values;
* submission, waiting, failure, timeouts and the retry that attaches to the existing TrainJob,
  against a loopback stand-in of the Kubernetes API: a real HTTP server on 127.0.0.1 that
  implements the two custom-objects endpoints the launcher calls (POST create, GET by name),
  answers 409 AlreadyExists to a duplicate create and plays scripted status conditions. The
  official ``kubernetes`` client is not mocked: a real ``kubernetes.client.ApiClient`` talks
  HTTP to that server;
* the whole ``train-trainjob`` step with the S3 test server (moto) and the real MLflow server: the
  step publishes a real (tiny digits) aggregate folder, the stand-in "cluster" runs what node rank 0
  of the created TrainJob runs with the env it carries (the real ``prepare`` step, the node
  script's ``coreg train`` command as one process instead of under ``torchrun``: distributed
  training itself is tested in tests/test_distributed.py; then the real ``publish`` step), and the
  step downloads the published train folder as its output and logs it to the run's MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from coreg.config import DEFAULT_CONFIG
from coreg.errors import CoregError
from coreg.trainjob import (
    GROUP,
    MAX_TRAINJOB_ATTEMPTS,
    PLURAL,
    RUN_ID_ANNOTATION,
    SCRATCH,
    VERSION,
    TrainJobOptions,
    TrainJobSpec,
    attempt_name,
    launch,
    render,
    submit,
    trainjob_name,
    validated,
    wait,
)

RUN_ID = "3f0c2a9e-5b1d-4c6e-9a7f-1e2d3c4b5a69"
NAMESPACE = "coreg"
IMAGE = "registry.example.com/coreg:0.1.0"


def _options(**overrides: Any) -> TrainJobOptions:
    base = {"num_nodes": 3, "procs_per_node": 2, "gpus_per_node": 2, "image": IMAGE, "cpu": "8",
            "memory": "32Gi", "poll_s": 0.01, "timeout_s": 60}
    return TrainJobOptions(**{**base, **overrides})


def _spec(**overrides: Any) -> TrainJobSpec:
    base = {"name": trainjob_name(RUN_ID), "namespace": NAMESPACE, "kfp_run_id": RUN_ID, "run_name": "nightly",
            "config_yaml": DEFAULT_CONFIG.read_text(encoding="utf-8"),
            "candidates_uri": f"s3://bucket/runs/{RUN_ID}/aggregate", "output_uri": f"s3://bucket/runs/{RUN_ID}/train",
            "options": _options()}
    return TrainJobSpec(**{**base, **overrides})


def _env(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in obj["spec"]["trainer"]["env"]}


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    (patch,) = obj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


# ----------------------------------------------------------------------------- rendering
def test_render_targets_torch_distributed_with_nodes_gpus_and_resources() -> None:
    obj = render(_spec())
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and obj["kind"] == "TrainJob"
    assert obj["metadata"]["name"] == trainjob_name(RUN_ID) and obj["metadata"]["namespace"] == NAMESPACE
    assert obj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    trainer = obj["spec"]["trainer"]
    assert trainer["image"] == IMAGE
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 2
    expected = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert trainer["resourcesPerNode"] == {"requests": expected, "limits": expected}
    # The object is plain JSON (what the API server receives).
    assert json.loads(json.dumps(obj)) == obj


def test_render_command_runs_coreg_train_under_torchrun_with_the_run_config() -> None:
    spec = _spec()
    trainer = render(spec)["spec"]["trainer"]
    assert trainer["command"] == ["/bin/sh", "-ec"]
    (script,) = trainer["args"]
    lines = [ln for ln in script.splitlines() if ln.strip()]
    assert lines[0] == "python -m coreg.trainjob prepare"
    assert re.fullmatch(r"torchrun --no-python coreg train --quiet --config /scratch/config\.yaml "
                        r"--candidates /scratch/aggregate --out /scratch/train", lines[1]), lines[1]
    # Only node rank 0 (global rank 0 under the static rendezvous) publishes, after torchrun succeeded.
    assert "PET_NODE_RANK" in lines[2] and "python -m coreg.trainjob publish" in lines[2]
    # No rendezvous flags: torchrun takes them from the runtime's PET_* variables.
    assert "--nnodes" not in script and "--master" not in script
    env = _env(render(spec))
    assert yaml.safe_load(env["COREG_CONFIG_YAML"]["value"]) == yaml.safe_load(spec.config_yaml)
    assert env["COREG_CANDIDATES_URI"]["value"] == spec.candidates_uri
    assert env["COREG_OUTPUT_URI"]["value"] == spec.output_uri
    assert env["COREG_KFP_RUN_ID"]["value"] == RUN_ID
    assert env["COREG_CACHE_DIR"]["value"].startswith("/scratch/")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == ("coreg-s3" if key.startswith("AWS") else "coreg-mlflow") and ref["optional"] is True


def test_render_labels_annotations_and_pod_settings() -> None:
    obj = render(_spec())
    meta = obj["metadata"]
    assert meta["labels"]["app.kubernetes.io/part-of"] == "coreg"
    assert meta["labels"]["app.kubernetes.io/name"] == "coreg-train"
    assert meta["labels"]["coreg.io/kfp-run-id"] == RUN_ID
    assert meta["annotations"][RUN_ID_ANNOTATION] == RUN_ID and meta["annotations"]["coreg.io/run-name"] == "nightly"
    pod = _pod(obj)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert "emptyDir" in volumes[mounts["/scratch"]] and "emptyDir" in volumes[mounts["/tmp"]]


def test_render_cpu_only_and_without_secrets() -> None:
    obj = render(_spec(options=_options(gpus_per_node=0, procs_per_node=4, tolerations=[], node_selector={},
                                        s3_secret="", mlflow_secret=None)))
    trainer = obj["spec"]["trainer"]
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    assert trainer["numProcPerNode"] == 4
    assert not any("valueFrom" in e for e in trainer["env"])
    pod = _pod(obj)
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_options_round_trip_through_a_kfp_parameter() -> None:
    opts = _options(s3_secret=None, tolerations=[{"key": "gpu", "operator": "Exists", "effect": None}])
    param = opts.as_parameter()
    assert "null" not in json.dumps(param)
    # KFP hands ints back as floats (protobuf Struct numbers).
    back = TrainJobOptions(**{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                              for k, v in param.items()})
    assert back == opts


def test_name_is_deterministic_short_and_dns_safe() -> None:
    name = trainjob_name(RUN_ID)
    assert name == trainjob_name(RUN_ID) and name.startswith("coreg-3f0c2a9e-")
    assert name != trainjob_name(RUN_ID.replace("3f0c", "3f0d"))
    for run_id in (RUN_ID, "local", "My Run/2024_01 ünïcode" * 5, "---", "a" * 300):
        name = trainjob_name(run_id)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 37, name
        _spec(name=name, kfp_run_id=run_id)  # valid as a spec too
    with pytest.raises(CoregError, match="run id"):
        trainjob_name("")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_nodes": 0}, "num_nodes"),
    ({"procs_per_node": 0}, "procs_per_node"),
    ({"procs_per_node": 4, "gpus_per_node": 2}, "one process per GPU"),
    ({"gpus_per_node": -1}, "gpus_per_node"),
    ({"cpu": "lots"}, "not a Kubernetes quantity"),
    ({"memory": "32 GB"}, "not a Kubernetes quantity"),
    ({"shm_size": ""}, "not a Kubernetes quantity"),
    ({"gpu_resource": "gpu"}, "extended resource name"),
    ({"image": "ghcr.io/coreg/coreg 0.1.0"}, "image"),
    ({"image": ""}, "image"),
    ({"runtime": "Torch_Distributed"}, "runtime"),
    ({"namespace": "Coreg"}, "namespace"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"tolerations": [{"key": "x", "operator": "Sometimes"}]}, "operator"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_options_fail_with_one_line(overrides: dict[str, Any], message: str) -> None:
    base = {"image": IMAGE}
    with pytest.raises(CoregError, match=re.escape(message)) as info:
        validated(TrainJobOptions, "TrainJob options", **{**base, **overrides})
    assert "\n" not in str(info.value) and str(info.value).startswith("TrainJob options: invalid field")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"name": "Coreg_Train"}, "DNS-1035"),
    ({"name": "x" * 38}, "at most 37"),
    ({"namespace": ""}, "namespace"),
    ({"kfp_run_id": ""}, "kfp_run_id"),
    ({"candidates_uri": "/data/aggregate"}, "s3://"),
    ({"output_uri": "s3://"}, "s3://"),
    ({"config_yaml": "train: [unclosed"}, "not valid YAML"),
    ({"config_yaml": "- a list"}, "mapping"),
    ({"config_yaml": "train:\n  epochs: -3\n"}, "train.epochs"),
    ({"config_yaml": "train:\n  method: dividemix\n"}, "only coreg trains under torchrun"),
])
def test_bad_specs_fail_with_one_line(overrides: dict[str, Any], message: str) -> None:
    base = _spec().model_dump()
    base["options"] = _options()
    with pytest.raises(CoregError, match=re.escape(message)) as info:
        validated(TrainJobSpec, "TrainJob", **{**base, **overrides})
    assert "\n" not in str(info.value)


def test_build_spec_needs_an_s3_storage_uri() -> None:
    from coreg.steps import StepSettings
    from coreg.trainjob import build_spec

    with pytest.raises(CoregError, match="needs storage_uri"):
        build_spec(StepSettings(kfp_run_id=RUN_ID), _options(namespace=NAMESPACE))
    spec = build_spec(StepSettings(kfp_run_id=RUN_ID, storage_uri="s3://bucket/runs", run_name="r",
                                   overrides=["train.epochs=30"]), _options(namespace=NAMESPACE))
    assert spec.candidates_uri == f"s3://bucket/runs/{RUN_ID}/aggregate"
    assert spec.output_uri == f"s3://bucket/runs/{RUN_ID}/train"
    config = yaml.safe_load(spec.config_yaml)
    assert config["train"]["epochs"] == 30 and config["storage"]["uri"] == "s3://bucket/runs"
    assert spec.name == trainjob_name(RUN_ID) and spec.namespace == NAMESPACE


# ----------------------------------------------------------------------------- loopback Kubernetes API
@dataclass
class FakeCluster:
    """State of the stand-in API server: stored TrainJobs, scripted statuses, request log."""

    url: str = ""
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Per TrainJob name: the status to show on each successive GET (the last one stays).
    script: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Per (method, name): HTTP codes to answer instead, once each (e.g. a 503 on the first GET).
    faults: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Called with the stored object when a scripted status turns Complete (plays the nodes).
    on_complete: Callable[[dict[str, Any]], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.requests if m == method)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _conditions(*types: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"conditions": [{"type": t, "status": "True", "reason": reason or t, "message": message,
                            "lastTransitionTime": "2025-01-01T00:00:00Z"} for t in types]}


def _handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/"
    pattern = re.compile(rf"^{re.escape(base)}([^/]+)/{PLURAL}(?:/([^/?]+))?(?:\?.*)?$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _fault(self, method: str, name: str) -> bool:
            codes = cluster.faults.get((method, name)) or []
            if not codes:
                return False
            code = codes.pop(0)
            self._send(code, _status(code, "Injected", f"injected HTTP {code}"))
            return True

        def do_POST(self) -> None:
            match = pattern.match(self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not match or match.group(2):
                return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
            namespace, name = match.group(1), body.get("metadata", {}).get("name", "")
            with cluster.lock:
                cluster.requests.append(("POST", name))
                if self._fault("POST", name):
                    return None
                if body.get("apiVersion") != f"{GROUP}/{VERSION}" or body.get("kind") != "TrainJob" \
                        or body["metadata"].get("namespace") != namespace:
                    return self._send(400, _status(400, "BadRequest", "wrong apiVersion, kind or namespace"))
                if (namespace, name) in cluster.objects:
                    return self._send(409, _status(
                        409, "AlreadyExists", f'trainjobs.{GROUP} "{name}" already exists'))
                stored = json.loads(json.dumps(body))
                stored["metadata"].update(uid=f"uid-{len(cluster.objects)}", resourceVersion="1",
                                          creationTimestamp="2025-01-01T00:00:00Z")
                cluster.objects[(namespace, name)] = stored
                return self._send(201, stored)

        def do_GET(self) -> None:
            match = pattern.match(self.path)
            if not match or not match.group(2):
                return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
            namespace, name = match.group(1), match.group(2)
            with cluster.lock:
                cluster.requests.append(("GET", name))
                if self._fault("GET", name):
                    return None
                obj = cluster.objects.get((namespace, name))
                if obj is None:
                    return self._send(404, _status(404, "NotFound", f'trainjobs.{GROUP} "{name}" not found'))
                steps = cluster.script.get(name) or []
                if steps:
                    status = steps.pop(0) if len(steps) > 1 else steps[0]
                    was_complete = any(c["type"] == "Complete" for c in (obj.get("status") or {}).get(
                        "conditions", []))
                    obj["status"] = status
                    done = any(c["type"] == "Complete" for c in status.get("conditions", []))
                    if done and not was_complete and cluster.on_complete is not None:
                        cluster.on_complete(obj)
                return self._send(200, obj)

    return Handler


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    """The loopback Kubernetes API stand-in, on a free port of 127.0.0.1."""
    state = FakeCluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def api_client(cluster: FakeCluster) -> Iterator[Any]:
    """A real kubernetes.client.ApiClient pointed at the stand-in (no retries: failures surface at once)."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = cluster.url
    configuration.retries = 0
    api = client.ApiClient(configuration)
    try:
        yield api
    finally:
        api.close()


def _no_sleep(_: float) -> None:
    pass


def test_submit_creates_and_wait_follows_the_conditions(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [{}, _conditions("Created"), _conditions("Created"),
                                 _conditions("Created", "Complete", reason="JobSetCompleted")]
    final = launch(spec, api_client, sleep=_no_sleep)
    assert cluster.count("POST") == 1 and cluster.count("GET") == 4
    stored = cluster.objects[(NAMESPACE, spec.name)]
    assert stored["spec"] == render(spec)["spec"], "the API server received the rendered TrainJob"
    assert any(c["type"] == "Complete" for c in final["status"]["conditions"])


def test_failed_trainjob_fails_with_its_name_and_reason_in_one_line(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [_conditions("Created"), _conditions(
        "Created", "Failed", reason="JobSetFailed",
        message="jobset failed: job \"node-0\"\n reached BackoffLimitExceeded")]
    with pytest.raises(CoregError) as info:
        launch(spec, api_client, sleep=_no_sleep)
    message = str(info.value)
    assert message == (f"TrainJob {NAMESPACE}/{spec.name} failed: JobSetFailed: jobset failed: "
                       'job "node-0" reached BackoffLimitExceeded')


def test_a_retried_task_attaches_to_the_existing_trainjob(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [_conditions("Created")]
    # First attempt: creates the TrainJob, then its pod is lost while waiting (here: a timeout).
    obj, created = submit(spec, api_client)
    assert created and obj["metadata"]["uid"] == "uid-0"
    # The retry derives the same name from the same run, gets 409 and follows the same TrainJob.
    cluster.script[spec.name] = [_conditions("Created"), _conditions("Created", "Complete")]
    final = launch(_spec(), api_client, sleep=_no_sleep)
    assert cluster.count("POST") == 2 and len(cluster.objects) == 1
    assert final["metadata"]["uid"] == "uid-0"
    obj, created = submit(spec, api_client)
    assert not created and obj["metadata"]["uid"] == "uid-0"


def test_a_retry_after_a_failed_trainjob_trains_again_under_the_next_name(cluster: FakeCluster,
                                                                        api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [_conditions("Created", "Failed", reason="JobSetFailed", message="node-0 OOMKilled")]
    with pytest.raises(CoregError, match="failed: JobSetFailed: node-0 OOMKilled"):
        launch(spec, api_client, sleep=_no_sleep)
    # The retried task: the failed TrainJob stays (its pods' logs), a second one trains.
    second = attempt_name(spec.name, 2)
    cluster.script[second] = [_conditions("Created"), _conditions("Created", "Complete")]
    final = launch(_spec(), api_client, sleep=_no_sleep)
    assert final["metadata"]["name"] == second == f"{spec.name}-a2"
    assert set(cluster.objects) == {(NAMESPACE, spec.name), (NAMESPACE, second)}
    assert final["metadata"]["annotations"][RUN_ID_ANNOTATION] == spec.kfp_run_id
    # A further retry (the pod lost after training) follows the finished second attempt.
    obj, created = submit(spec, api_client)
    assert not created and obj["metadata"]["name"] == second


def test_retries_stop_after_the_last_allowed_trainjob_failed(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    for attempt in range(1, MAX_TRAINJOB_ATTEMPTS + 1):
        cluster.script[attempt_name(spec.name, attempt)] = [_conditions("Failed", reason="JobSetFailed",
                                                                        message=f"attempt {attempt}")]
        with pytest.raises(CoregError, match=f"failed: JobSetFailed: attempt {attempt}$"):
            launch(spec, api_client, sleep=_no_sleep)
    posts = cluster.count("POST")
    with pytest.raises(CoregError) as info:
        launch(spec, api_client, sleep=_no_sleep)
    assert str(info.value) == (
        f"TrainJob {NAMESPACE}/{spec.name}: all {MAX_TRAINJOB_ATTEMPTS} attempts of pipeline run {spec.kfp_run_id} "
        f"failed, the last: {attempt_name(spec.name, MAX_TRAINJOB_ATTEMPTS)} failed (JobSetFailed: attempt "
        f"{MAX_TRAINJOB_ATTEMPTS}); delete them to train again")
    assert len(cluster.objects) == MAX_TRAINJOB_ATTEMPTS
    assert cluster.count("POST") - posts == MAX_TRAINJOB_ATTEMPTS, "each name was tried once, none created"


def test_a_trainjob_of_another_run_is_not_adopted(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    submit(spec.model_copy(update={"kfp_run_id": "another-run"}), api_client)
    with pytest.raises(CoregError, match="belongs to pipeline run another-run"):
        submit(spec, api_client)


def test_forbidden_create_points_at_the_rbac(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.faults[("POST", spec.name)] = [403]
    with pytest.raises(CoregError, match=r"cannot create \(HTTP 403: injected HTTP 403\).*rbac\.yaml") as info:
        launch(spec, api_client, sleep=_no_sleep)
    assert str(info.value).startswith(f"TrainJob {NAMESPACE}/{spec.name}: ")


def test_transient_api_errors_while_waiting_are_retried(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [_conditions("Complete")]
    submit(spec, api_client)
    cluster.faults[("GET", spec.name)] = [503, 500]
    final = wait(spec.name, NAMESPACE, api_client, timeout_s=60, poll_s=0.01, sleep=_no_sleep)
    assert cluster.count("GET") == 3 and final["status"]["conditions"][0]["type"] == "Complete"


def test_a_deleted_trainjob_ends_the_wait(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    submit(spec, api_client)
    del cluster.objects[(NAMESPACE, spec.name)]
    with pytest.raises(CoregError, match=f"TrainJob {NAMESPACE}/{spec.name}: deleted"):
        wait(spec.name, NAMESPACE, api_client, timeout_s=60, poll_s=0.01, sleep=_no_sleep)


def test_wait_times_out_with_the_last_state(cluster: FakeCluster, api_client: Any) -> None:
    spec = _spec()
    cluster.script[spec.name] = [_conditions("Created", "Suspended")]
    submit(spec, api_client)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(CoregError, match=r"not finished after 120 s \(last state: Created, Suspended\).*delete "
                                         rf"trainjob {spec.name}"):
        wait(spec.name, NAMESPACE, api_client, timeout_s=120, poll_s=30, clock=lambda: now[0], sleep=sleep)
    assert cluster.count("GET") == 5  # t = 0, 30, 60, 90, 120


# ----------------------------------------------------------------------------- the pipeline step, end to end
# A tiny digits run: 200 images, 3 annotators; the training budget travels as run overrides (StepSettings),
# so it reaches the nodes inside the TrainJob's COREG_CONFIG_YAML as in production.
DATA = ["data.limit=200", "annotate.num_annotators=3"]
BUDGET = ["train.epochs=2", "train.warmup_epochs=1", "train.rampup_epochs=1", "train.reg_start_offset=0",
          "train.batch_size=32", "train.warmup_batch_size=32", "train.queue_size=64", "train.proj_hidden=64",
          "train.proj_dim=32", "train.device=cpu", "train.num_workers=0"]


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real aggregate folder: ``coreg annotate`` + ``coreg aggregate`` on 200 digits with 3 annotators."""
    from coreg.cli import main

    out = tmp_path_factory.mktemp("trainjob-digits")
    args = ["--quiet", "--set", f"output_dir={out}"]
    for item in DATA:
        args += ["--set", item]
    assert main(["annotate", *args]) == 0
    assert main(["aggregate", *args]) == 0
    return out / "aggregate"


def _node_train_argv(obj: dict[str, Any], scratch: Path) -> list[str]:
    """The ``coreg train`` command of the TrainJob's node script, without torchrun, on a local scratch folder."""
    import shlex

    (script,) = obj["spec"]["trainer"]["args"]
    (line,) = [ln for ln in script.splitlines() if ln.startswith("torchrun ")]
    argv = shlex.split(line.replace(SCRATCH, str(scratch)))
    return argv[argv.index("coreg") + 1:]


def test_launch_step_publishes_inputs_runs_the_node_steps_and_fetches_the_model(
        cluster: FakeCluster, api_client: Any, s3_server: Any, mlflow_server: Any, aggregated: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``train-trainjob`` step against S3 (moto) and a real MLflow server; the stand-in cluster plays the nodes.

    When the scripted status turns Complete, the "cluster" runs what node rank 0 of the created TrainJob
    runs, with the env it carries: the real ``prepare`` step, the node script's ``coreg train`` command on
    the prepared scratch folder, then the real ``publish`` step. ``coreg train`` runs as one process
    (in-process ``coreg.cli.main``) rather than under ``torchrun``: starting torchrun here costs too much,
    and distributed training itself is tested in tests/test_distributed.py.
    """
    import boto3
    import mlflow

    from coreg import trainjob
    from coreg.cli import main as coreg_main
    from coreg.steps import StepSettings
    from coreg.storage import read_manifest, split_s3
    from coreg.tracking import KFP_RUN_TAG

    storage_uri = f"s3://{s3_server.bucket}/trainjob-runs"
    scratch = tmp_path / "node-0-scratch"
    ran: list[str] = []

    def play_the_nodes(obj: dict[str, Any]) -> None:
        """What node rank 0 does, with the env of the created TrainJob (its /scratch mapped to a temp folder)."""
        with monkeypatch.context() as env:
            for item in obj["spec"]["trainer"]["env"]:
                if "value" in item:
                    env.setenv(item["name"], item["value"].replace(SCRATCH, str(scratch))
                               if item["value"].startswith(SCRATCH) else item["value"])
            assert os.environ["COREG_SCRATCH"] == str(scratch)
            assert trainjob.main(["prepare"]) == 0
            for name in ("candidates.parquet", "classes.json", "samples.parquet"):
                assert (scratch / "aggregate" / name).read_bytes() == (aggregated / name).read_bytes()
            config = yaml.safe_load((scratch / "config.yaml").read_text())
            assert config["train"]["epochs"] == 2 and config["data"]["limit"] == 200
            assert coreg_main(_node_train_argv(obj, scratch)) == 0
            assert trainjob.main(["publish"]) == 0
        ran.append(obj["metadata"]["name"])

    cluster.on_complete = play_the_nodes
    name = trainjob_name(RUN_ID)
    cluster.script[name] = [_conditions("Created"), _conditions("Created", "Complete")]
    settings = StepSettings(kfp_run_id=RUN_ID, run_name="nightly", storage_uri=storage_uri,
                            tracking_uri=mlflow_server.uri, experiment="trainjob", overrides=[*DATA, *BUDGET])
    out = tmp_path / "model-artifact"
    result = trainjob.launch_step(settings, _options(namespace=NAMESPACE).as_parameter(), str(aggregated),
                                  str(out), api_client=api_client, sleep=_no_sleep)
    assert ran == [name]
    assert read_manifest(f"{storage_uri}/{RUN_ID}/aggregate").meta["stage"] == "aggregate"
    assert result["published_uri"] == f"{storage_uri}/{RUN_ID}/train"
    assert result["trainjob"] == f"{NAMESPACE}/{name}"
    manifest = read_manifest(result["published_uri"])
    assert manifest.meta == {"stage": "train", "kfp_run_id": RUN_ID, "trainjob": name}
    assert {"model.pt", "history.json"} <= {f.path for f in manifest.files}
    # The fetched model is the published one, which is what the node trained.
    bucket, prefix = split_s3(result["published_uri"])
    published = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/model.pt")["Body"].read()
    assert (out / "model.pt").read_bytes() == published == (scratch / "train" / "model.pt").read_bytes()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2

    # The real MLflow run of this pipeline run holds the train stage. Both URIs explicit: the fluent
    # API's are process-global and another test may have pointed them elsewhere.
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("trainjob")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.{KFP_RUN_TAG} = '{RUN_ID}'")
    assert result["mlflow_run_id"] == run.info.run_id
    assert run.info.run_name == "nightly"
    assert run.data.params["train.epochs"] == "2" and run.data.params["data.limit"] == "200"
    assert run.data.tags["coreg.stages_done"] == "train"
    assert run.data.metrics["train.epochs_run"] == 2.0
    losses = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in losses) == [int(h["epoch"]) for h in history]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "train")} == {"train/history.json"}


def test_component_is_a_thin_wrapper_with_the_train_interface() -> None:
    import inspect

    from components.image import IMAGE as DEFAULT_IMAGE
    from components.train.component import train_op
    from components.trainjob.component import train_trainjob_op

    def interface(op: Any) -> tuple[set[str], dict[str, str], dict[str, str]]:
        comp = next(iter(op.pipeline_spec.components.values()))
        return (set(comp.input_definitions.parameters),
                {k: v.artifact_type.schema_title for k, v in comp.input_definitions.artifacts.items()},
                {k: v.artifact_type.schema_title for k, v in comp.output_definitions.artifacts.items()})

    params, inputs, outputs = interface(train_trainjob_op)
    train_params, train_inputs, train_outputs = interface(train_op)
    assert params == train_params | {"trainjob"}
    assert (inputs, outputs) == (train_inputs, train_outputs), "a drop-in replacement of the train task"
    executor = next(iter(train_trainjob_op.pipeline_spec.deployment_spec.fields["executors"].struct_value
                         .fields.values())).struct_value.fields["container"].struct_value.fields
    assert executor["image"].string_value == DEFAULT_IMAGE
    body = inspect.getsource(train_trainjob_op.python_func).split('"""', 2)[-1]
    assert "from coreg.trainjob import launch_step" in body and "pip install" not in body
