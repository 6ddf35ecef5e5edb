"""Multi-node training: render, submit and follow a Kubeflow Trainer ``TrainJob`` for one pipeline run.

The pipeline's ``train`` task trains in its own pod (one node). With ``train_nodes > 1``
(``ClusterOptions.train_nodes``, ``coreg pipeline compile --train-nodes N``) the pipeline runs
the ``train-trainjob`` task instead, which calls :func:`launch_step`:

1. it resolves the run's config like every step and checks the aggregate folder is published
   at ``<storage_uri>/<kfp_run_id>/aggregate`` (publishing its local copy there if not);
2. it renders a ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, runtime ``torch-distributed``,
   ``numNodes`` pods with ``resourcesPerNode``), validated by :class:`TrainJobSpec`, and creates it
   with the official ``kubernetes`` client. The name is derived from the KFP run id, so a retried
   task finds the TrainJob of its first attempt (HTTP 409) and attaches to it instead of starting a
   second training; when that TrainJob failed, the retry starts ``<name>-a2`` (then ``-a3``, ...,
   at most ``MAX_TRAINJOB_ATTEMPTS``) and the failed one stays for its logs;
3. it polls the TrainJob's status conditions until ``Complete`` or ``Failed`` (or a timeout): a
   failure is a one-line :class:`CoregError` naming the TrainJob and the reason the Trainer gave;
4. it downloads the train folder node rank 0 published to ``<storage_uri>/<kfp_run_id>/train``
   (checksums verified) as the task's ``model`` artifact and logs it to the run's MLflow run.

S3 is the storage the nodes share: no ReadWriteMany volume is needed, but ``storage_uri`` must be
set. Each node runs (see :func:`node_script`)::

    python -m coreg.trainjob prepare      # run config + aggregate folder (+ s3:// data) into /scratch
    torchrun --no-python coreg train --quiet --config /scratch/config.yaml \\
        --candidates /scratch/aggregate --out /scratch/train
    python -m coreg.trainjob publish      # node rank 0 only: /scratch/train -> COREG_OUTPUT_URI

``coreg train`` refuses ``s3://`` outputs under torchrun (every rank would publish), so the
node writes locally and the publish step runs once, after torchrun returned, on node rank 0 (which
holds global rank 0 under the runtime's static rendezvous: the rank that writes the folder).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coreg.errors import CoregError

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
# What the launcher asks of the API server (k8s/base/rbac.yaml grants exactly these on trainjobs).
REQUIRED_VERBS = ("create", "get")
RUN_ID_ANNOTATION = "coreg.io/kfp-run-id"
# TrainJobs one pipeline run may create: a retried task after a failed TrainJob starts the next one.
MAX_TRAINJOB_ATTEMPTS = 5
RUN_ID_LABEL = "coreg.io/kfp-run-id"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
IMAGE_UID = 10001
SCRATCH = "/scratch"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _namespace_name(value: str) -> str:
    """``value`` if it is a valid Kubernetes namespace name (a DNS-1123 label), else ValueError."""
    if not _DNS_LABEL.match(value) or len(value) > 63:
        raise ValueError(f"namespace {value!r} is not a valid namespace name")
    return value


def _quantity(value: str, what: str) -> str:
    value = str(value).strip()
    if not _QUANTITY.match(value) or not re.search(r"[0-9]", value):
        raise ValueError(f"{what} {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 32Gi)")
    return value


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"

    @field_validator("value", "effect", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("operator")
    @classmethod
    def _operator(cls, value: str) -> str:
        if value not in ("Exists", "Equal"):
            raise ValueError(f"toleration operator {value!r}: Exists or Equal")
        return value


class TrainJobOptions(BaseModel):
    """Cluster settings of the TrainJob (fixed when the pipeline is compiled; see ClusterOptions)."""

    model_config = ConfigDict(extra="forbid")

    num_nodes: Annotated[int, Field(ge=1, le=1024)] = Field(2, description="Pods (nodes) of the TrainJob.")
    procs_per_node: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="torchrun processes per node (numProcPerNode); one per GPU.")
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = Field(1, description="GPUs per node (0: CPU, gloo).")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of the GPUs.")
    cpu: str = Field("8", description="CPU request and limit per node.")
    memory: str = Field("32Gi", description="Memory request and limit per node.")
    image: str = Field(..., min_length=1, description="Image of the nodes: the project image.")
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the TrainJob refers to.")
    namespace: str = Field("", description="Namespace of the TrainJob; empty: the launcher pod's own.")
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    shm_size: str = Field("8Gi", description="Memory-backed /dev/shm of each node.")
    scratch_size: str = Field("50Gi", description="emptyDir /scratch: run config, inputs, data, train folder.")
    s3_secret: str | None = Field("coreg-s3", description="Secret with the AWS_* keys (required for S3).")
    mlflow_secret: str | None = Field("coreg-mlflow", description="Secret with MLFLOW_* keys; None: none.")
    timeout_s: Annotated[int, Field(ge=1)] = Field(
        7 * 24 * 3600, description="Seconds to wait for Complete/Failed before failing the task.")
    poll_s: Annotated[float, Field(gt=0, le=600)] = Field(15.0, description="Seconds between status polls.")

    @field_validator("s3_secret", "mlflow_secret", mode="before")
    @classmethod
    def _no_secret(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("cpu", "memory", "shm_size", "scratch_size")
    @classmethod
    def _quantities(cls, value: str, info: Any) -> str:
        return _quantity(value, info.field_name)

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        if not _RESOURCE_NAME.match(value) or "/" not in value:
            raise ValueError(f"gpu_resource {value!r} is not an extended resource name (e.g. nvidia.com/gpu)")
        return value

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, value: str) -> str:
        if not _DNS_SUBDOMAIN.match(value) or len(value) > 253:
            raise ValueError(f"runtime {value!r} is not a valid resource name")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _namespace_name(value) if value else value  # empty: the launcher pod's own

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"image {value!r} must be a non-empty image reference without spaces")
        return value

    def as_parameter(self) -> dict[str, Any]:
        """A plain dict for a KFP parameter (which cannot hold None: "" stands for None, read back as None)."""
        def no_none(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: no_none(v) for k, v in value.items()}
            if isinstance(value, list):
                return [no_none(v) for v in value]
            return "" if value is None else value

        return no_none(self.model_dump(mode="json"))

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> TrainJobOptions:
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise ValueError(f"procs_per_node ({self.procs_per_node}) exceeds gpus_per_node "
                             f"({self.gpus_per_node}): one process per GPU")
        return self


class TrainJobSpec(BaseModel):
    """One TrainJob: the run it trains for, its inputs/outputs and the cluster options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    namespace: str
    kfp_run_id: str = Field(..., min_length=1)
    run_name: str = ""
    config_yaml: str = Field(..., min_length=1, description="The resolved run config, as YAML.")
    candidates_uri: str
    output_uri: str
    options: TrainJobOptions

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _DNS_LABEL.match(value) or len(value) > 37:
            raise ValueError(f"name {value!r}: a DNS-1035 label of at most 37 characters (retries add '-aN', "
                             "JobSet adds suffixes)")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _namespace_name(value)

    @field_validator("candidates_uri", "output_uri")
    @classmethod
    def _s3(cls, value: str, info: Any) -> str:
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            raise ValueError(f"{info.field_name} {value!r}: the nodes share data through S3, an s3:// URI is needed")
        return value

    @field_validator("config_yaml")
    @classmethod
    def _config(cls, value: str) -> str:
        from coreg.config import parse_config

        try:
            raw = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError("config_yaml is not valid YAML") from None
        if not isinstance(raw, dict):
            raise ValueError("config_yaml must be a mapping of sections")
        try:
            config = parse_config(raw, source="TrainJob config")
        except CoregError as err:
            raise ValueError(str(err)) from None
        if config.train.method != "coreg":
            raise ValueError(f"train.method {config.train.method!r}: only coreg trains under torchrun")
        return value

    def render(self) -> dict[str, Any]:
        """The TrainJob object (a dict the Kubernetes API accepts as JSON)."""
        return render(self)


def validated(model: type[BaseModel], what: str, **fields: Any) -> Any:
    """``model(**fields)`` with a one-line CoregError naming the first bad field."""
    try:
        return model(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        msg = first["msg"].removeprefix("Value error, ")
        raise CoregError(f"{what}: invalid field '{loc}': {msg}") from None


def trainjob_name(kfp_run_id: str) -> str:
    """The TrainJob name of a pipeline run: the same on every retry of the task, short and DNS-safe.

    ``coreg-<first 8 characters of the run id>-<8 hex of its SHA-256>`` (23 characters), so it can
    be told apart in ``kubectl get trainjobs`` and JobSet's pod names stay below 63 characters.
    """
    if not kfp_run_id:
        raise CoregError("TrainJob name: the pipeline run id (kfp_run_id) is empty")
    readable = re.sub(r"[^a-z0-9]+", "-", kfp_run_id.lower()).strip("-")[:8].strip("-") or "run"
    digest = hashlib.sha256(kfp_run_id.encode()).hexdigest()[:8]
    return f"coreg-{readable}-{digest}"


def label_value(value: str) -> str:
    """``value`` as a valid label value (<= 63 characters; unsafe characters replaced)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.")
    return cleaned if _LABEL_VALUE.match(cleaned) else ""


def node_script(spec: TrainJobSpec) -> str:
    """The shell script each node runs (``sh -ec``: any failing step fails the pod)."""
    scratch = SCRATCH
    return "\n".join([
        "python -m coreg.trainjob prepare",
        f"torchrun --no-python coreg train --quiet --config {scratch}/config.yaml "
        f"--candidates {scratch}/aggregate --out {scratch}/train",
        'if [ "${PET_NODE_RANK:-0}" = "0" ]; then python -m coreg.trainjob publish; fi',
        "",
    ])


def _secret_env(secret: str | None, keys: Sequence[str]) -> list[dict[str, Any]]:
    if not secret:
        return []
    # optional, as in the pipeline's tasks: a cluster without a key (workload identity instead of
    # access keys, no MLflow password) still starts the pods.
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in keys]


def render(spec: TrainJobSpec) -> dict[str, Any]:
    """Render the TrainJob of ``spec``: trainer (image, command, env, nodes, resources) + pod settings."""
    opts = spec.options
    resources: dict[str, str] = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.gpus_per_node:
        resources[opts.gpu_resource] = str(opts.gpus_per_node)
    env = [
        {"name": "COREG_CONFIG_YAML", "value": spec.config_yaml},
        {"name": "COREG_CANDIDATES_URI", "value": spec.candidates_uri},
        {"name": "COREG_OUTPUT_URI", "value": spec.output_uri},
        {"name": "COREG_KFP_RUN_ID", "value": spec.kfp_run_id},
        {"name": "COREG_TRAINJOB", "value": spec.name},
        {"name": "COREG_SCRATCH", "value": SCRATCH},
        # s3:// data is downloaded once per node into the scratch volume, not into /tmp.
        {"name": "COREG_CACHE_DIR", "value": f"{SCRATCH}/cache"},
        *_secret_env(opts.s3_secret, S3_ENV),
        *_secret_env(opts.mlflow_secret, MLFLOW_ENV),
    ]
    labels = {
        "app.kubernetes.io/name": "coreg-train",
        "app.kubernetes.io/part-of": "coreg",
        "app.kubernetes.io/managed-by": "coreg-pipeline",
    }
    run_label = label_value(spec.kfp_run_id)
    if run_label:
        labels[RUN_ID_LABEL] = run_label
    annotations = {RUN_ID_ANNOTATION: spec.kfp_run_id}
    if spec.run_name:
        annotations["coreg.io/run-name"] = spec.run_name
    non_root = {"runAsNonRoot": True, "runAsUser": IMAGE_UID}
    seccomp = {"seccompProfile": {"type": "RuntimeDefault"}}
    pod: dict[str, Any] = {
        "securityContext": {**non_root, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID, **seccomp},
        "containers": [{
            "name": "node",
            "securityContext": {**non_root, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}, **seccomp},
            "volumeMounts": [
                {"name": "scratch", "mountPath": SCRATCH},
                {"name": "cache", "mountPath": "/cache"},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }],
        "volumes": [
            {"name": "scratch", "emptyDir": {"sizeLimit": opts.scratch_size}},
            {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
            # torchrun and torch.distributed write rendezvous/log files here.
            {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
            # DataLoader workers and NCCL share memory through /dev/shm (64 MiB by default).
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}},
        ],
    }
    if opts.node_selector:
        pod["nodeSelector"] = dict(opts.node_selector)
    if opts.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in opts.tolerations]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": opts.runtime},
            "trainer": {
                "image": opts.image,
                "numNodes": opts.num_nodes,
                "numProcPerNode": opts.procs_per_node,
                "resourcesPerNode": {"requests": dict(resources), "limits": dict(resources)},
                "command": ["/bin/sh", "-ec"],
                "args": [node_script(spec)],
                "env": env,
            },
            # Pod-level settings of the runtime's "node" job (Trainer >= 2.3: runtimePatches).
            "runtimePatches": [{
                "manager": "coreg",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}},
            }],
        },
    }


# ----------------------------------------------------------------------------- Kubernetes API
def current_namespace(default: str = "default") -> str:
    """The launcher pod's namespace (its service account's), else ``default``."""
    try:
        value = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
    except OSError:
        value = ""
    return value or os.environ.get("POD_NAMESPACE", "") or default


def make_api_client() -> Any:
    """An ApiClient from the pod's service account (in cluster), else from the kubeconfig."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as err:
            raise CoregError(f"Kubernetes API: no in-cluster service account and no kubeconfig ({err})") from None
    return client.ApiClient(configuration)


def _api(api_client: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def _api_message(err: Any) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason; always one line."""
    import json

    message = ""
    try:
        message = json.loads(err.body or "{}").get("message", "")
    except (ValueError, AttributeError, TypeError):
        message = ""
    text = message or err.reason or ""
    return " ".join(str(text).split())


def _api_error(where: str, what: str, err: Any) -> CoregError:
    hint = ""
    if err.status == 403:
        hint = (" (the pipeline's service account needs create/get on trainjobs.trainer.kubeflow.org: "
                "k8s/base/rbac.yaml)")
    elif err.status == 404 and what == "create":
        hint = " (is Kubeflow Trainer installed? the TrainJob CRD or the namespace is missing)"
    return CoregError(f"{where}: cannot {what} (HTTP {err.status}: {_api_message(err)}){hint}")


def _transient(err: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        return err.status in (0, 429, 500, 502, 503, 504)
    return isinstance(err, OSError) or type(err).__module__.startswith("urllib3")


def attempt_name(base: str, attempt: int) -> str:
    """The TrainJob name of attempt ``attempt`` (1-based): ``base``, then ``base-a2``, ``base-a3``, ..."""
    return base if attempt == 1 else f"{base}-a{attempt}"


def submit(spec: TrainJobSpec, api_client: Any) -> tuple[dict[str, Any], bool]:
    """Create the TrainJob, or attach to the one an earlier attempt of this run created.

    Returns (object, created). Attempt names are tried in order (:func:`attempt_name`): one that
    exists and has not failed is followed (a retried task while training goes on, or after it
    finished); one that failed is kept for its pods' logs and the next name is tried, so a retry
    of the task after a failed training trains again instead of reporting the old failure. After
    ``MAX_TRAINJOB_ATTEMPTS`` failed TrainJobs the task stops with the last one's reason. A
    TrainJob of the same name that belongs to another run is an error.
    """
    from kubernetes.client.exceptions import ApiException

    api = _api(api_client)
    failed_before = ""
    for attempt in range(1, MAX_TRAINJOB_ATTEMPTS + 1):
        name = attempt_name(spec.name, attempt)
        where = f"TrainJob {spec.namespace}/{name}"
        try:
            obj = api.create_namespaced_custom_object(GROUP, VERSION, spec.namespace, PLURAL,
                                                      render(spec.model_copy(update={"name": name})))
            log.info("%s: created (%d nodes x %d processes)%s", where, spec.options.num_nodes,
                     spec.options.procs_per_node, f" after {failed_before}" if failed_before else "")
            return obj, True
        except ApiException as err:
            if err.status != 409:
                raise _api_error(where, "create", err) from None
        try:
            existing = api.get_namespaced_custom_object(GROUP, VERSION, spec.namespace, PLURAL, name)
        except ApiException as err:
            raise _api_error(where, "read the existing TrainJob", err) from None
        owner = ((existing.get("metadata") or {}).get("annotations") or {}).get(RUN_ID_ANNOTATION)
        if owner != spec.kfp_run_id:
            raise CoregError(f"{where}: exists but belongs to pipeline run {owner or '<unknown>'}, not "
                             f"{spec.kfp_run_id}; delete it or pick another namespace")
        failed = condition(existing, "Failed")
        if failed is None:
            log.info("%s: already exists (a retried task): following it instead of creating another", where)
            return existing, False
        failed_before = f"{name} failed ({_describe(failed)})"
        log.warning("%s: an earlier attempt that failed (%s); kept for its logs, trying the next name",
                    where, _describe(failed))
    raise CoregError(f"TrainJob {spec.namespace}/{spec.name}: all {MAX_TRAINJOB_ATTEMPTS} attempts of pipeline run "
                     f"{spec.kfp_run_id} failed, the last: {failed_before}; delete them to train again")


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The status condition of type ``kind`` when it is True."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def _describe(cond: dict[str, Any]) -> str:
    parts = [str(cond.get("reason") or "").strip(), str(cond.get("message") or "").strip()]
    return " ".join(": ".join(p for p in parts if p).split()) or "no reason given"


def wait(name: str, namespace: str, api_client: Any, timeout_s: float, poll_s: float = 15.0,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the TrainJob until a ``Complete`` or ``Failed`` condition is True; returns the final object."""
    from kubernetes.client.exceptions import ApiException

    api = _api(api_client)
    where = f"TrainJob {namespace}/{name}"
    deadline = clock() + timeout_s
    last = "no status yet"
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                raise CoregError(f"{where}: deleted while the pipeline waited for it") from None
            if not _transient(err):
                raise _api_error(where, "read its status", err) from None
            last = f"API error HTTP {err.status}"
            log.warning("%s: %s; polling again", where, last)
        except Exception as err:
            if not _transient(err):
                raise
            last = f"API unreachable ({type(err).__name__})"
            log.warning("%s: %s; polling again", where, last)
        else:
            failed = condition(obj, "Failed")
            if failed is not None:
                raise CoregError(f"{where} failed: {_describe(failed)}")
            if condition(obj, "Complete") is not None:
                log.info("%s: complete", where)
                return obj
            conds = [c for c in (obj.get("status") or {}).get("conditions") or [] if str(c.get("status")) == "True"]
            last = ", ".join(str(c.get("type")) for c in conds) or "running, no condition yet"
        if clock() >= deadline:
            raise CoregError(f"{where}: not finished after {timeout_s:g} s (last state: {last}); it keeps running: "
                             f"kubectl -n {namespace} delete trainjob {name}")
        sleep(max(0.0, min(poll_s, deadline - clock())))


def launch(spec: TrainJobSpec, api_client: Any = None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Submit (or attach to) the TrainJob and wait for it; returns the finished object."""
    api_client = api_client or make_api_client()
    obj, _ = submit(spec, api_client)
    return wait(obj["metadata"]["name"], spec.namespace, api_client, spec.options.timeout_s, spec.options.poll_s,
                clock=clock, sleep=sleep)


# ----------------------------------------------------------------------------- the pipeline step
def build_spec(settings: Any, options: TrainJobOptions, resolved: Any = None) -> TrainJobSpec:
    """The TrainJob of a pipeline run: resolved config, S3 input/output URIs, name from the run id."""
    from coreg.steps import resolve
    from coreg.storage import join_uri

    resolved = resolved or resolve(settings)
    storage_uri = resolved.storage.uri or ""
    if not storage_uri.startswith("s3://"):
        raise CoregError("multi-node training (TrainJob) needs storage_uri (s3://bucket/prefix): the nodes fetch "
                         "the aggregate folder from it and node rank 0 publishes the train folder there")
    config = resolved.config.model_copy(deep=True)
    config.storage = resolved.storage.model_copy()
    config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    namespace = options.namespace or current_namespace()
    return validated(TrainJobSpec, "TrainJob", name=trainjob_name(settings.kfp_run_id), namespace=namespace,
                     kfp_run_id=settings.kfp_run_id, run_name=settings.run_name, config_yaml=config_yaml,
                     candidates_uri=join_uri(storage_uri, settings.kfp_run_id, "aggregate"),
                     output_uri=join_uri(storage_uri, settings.kfp_run_id, "train"), options=options)


def ensure_published(local: str | None, uri: str, storage: Any, meta: dict[str, Any]) -> str:
    """``uri`` when a published folder is there, else publish the local input folder to it."""
    from coreg.storage import publish_dir, read_manifest

    try:
        read_manifest(uri, storage)
        return uri
    except CoregError:
        if not local or not Path(local).is_dir():
            raise CoregError(f"{uri}: the aggregate folder is not published and no local copy was given") from None
    log.info("publishing the aggregate folder to %s for the TrainJob's nodes", uri)
    return publish_dir(local, uri, storage, meta=meta)


def launch_step(settings: Any, options: TrainJobOptions | dict[str, Any], candidates_path: str | None,
                out_dir: str, api_client: Any = None, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """The ``train-trainjob`` task: train on a TrainJob, then hand the train folder on like ``train_step``."""
    from coreg.steps import resolve, track
    from coreg.storage import fetch_dir

    if isinstance(options, dict):
        options = validated(TrainJobOptions, "TrainJob options", **options)
    resolved = resolve(settings)
    spec = build_spec(settings, options, resolved)
    ensure_published(candidates_path, spec.candidates_uri, resolved.storage,
                     {"stage": "aggregate", "kfp_run_id": settings.kfp_run_id})
    final = launch(spec, api_client, clock=clock, sleep=sleep)
    folder = fetch_dir(spec.output_uri, Path(out_dir), resolved.storage)
    run_id = track(resolved, settings, "train", folder)
    return {"published_uri": spec.output_uri, "mlflow_run_id": run_id, "local_path": str(folder),
            "trainjob": f"{spec.namespace}/{final['metadata']['name']}",
            "trainjob_conditions": (final.get("status") or {}).get("conditions") or []}


# ----------------------------------------------------------------------------- on each node
def prepare(scratch: str | Path | None = None) -> Path:
    """Node step 1: write the run config and fetch the aggregate folder (and s3:// data) into scratch."""
    from coreg.config import parse_config
    from coreg.steps import local_data
    from coreg.storage import fetch_dir

    scratch = Path(scratch or os.environ.get("COREG_SCRATCH", SCRATCH))
    text = _env("COREG_CONFIG_YAML")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise CoregError("COREG_CONFIG_YAML: not valid YAML") from None
    config = parse_config(raw if isinstance(raw, dict) else {}, source="COREG_CONFIG_YAML")
    fetch_dir(_env("COREG_CANDIDATES_URI"), scratch / "aggregate", config.storage)
    config = local_data(config, config.storage)  # s3:// data -> $COREG_CACHE_DIR/data, once per node
    target = scratch / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return target


def publish(scratch: str | Path | None = None) -> str:
    """Node step 3 (node rank 0): publish the train folder to ``COREG_OUTPUT_URI``."""
    from coreg.config import load_config
    from coreg.storage import publish_dir

    scratch = Path(scratch or os.environ.get("COREG_SCRATCH", SCRATCH))
    config = load_config(scratch / "config.yaml")
    meta = {"stage": "train", "kfp_run_id": os.environ.get("COREG_KFP_RUN_ID", ""),
            "trainjob": os.environ.get("COREG_TRAINJOB", "")}
    return publish_dir(scratch / "train", _env("COREG_OUTPUT_URI"), config.storage, meta=meta)


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CoregError(f"{name} is not set (it is set by the TrainJob coreg.trainjob renders)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coreg.trainjob",
                                     description="The per-node steps of coreg's TrainJob.")
    parser.add_argument("step", choices=("prepare", "publish"))
    parser.add_argument("--scratch", default=None, help=f"scratch folder (default: $COREG_SCRATCH or {SCRATCH})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = prepare(args.scratch) if args.step == "prepare" else publish(args.scratch)
    except CoregError as err:
        print(f"coreg trainjob {args.step}: error: {err}", file=sys.stderr)
        return 2
    print(f"coreg trainjob {args.step}: done, {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
