"""The coreg pipeline: annotate -> aggregate -> train -> evaluate -> register-and-promote.

:func:`build_pipeline` returns a KFP pipeline function for a given image and cluster
settings (:class:`ClusterOptions`); ``coreg_pipeline`` is the default one (project image,
one GPU for training). Everything run-specific is a pipeline parameter, so one compiled
YAML serves every run and schedule:

- ``config_yaml``: the whole run config as YAML text (empty: the bundled digits demo; a
  multi-line default would break the comment header KFP writes into the IR), plus
  ``overrides`` (``["train.epochs=5", ...]``), ``data_uri`` and ``class_names``;
- ``annotations_uri``: an existing annotate folder (``s3://...`` published by an earlier
  run); when set, annotate is skipped (``dsl.importer`` under ``dsl.If``/``dsl.Else``);
- ``tracking_uri``, ``experiment``, ``model_name``: MLflow (empty: the config's or the env's);
- ``storage_uri``: ``s3://bucket/prefix`` that receives every stage folder per run.

Cluster settings (GPU, tolerations, node selector, /dev/shm, requests, retries, secrets)
are fixed at compile time; the local runner ignores them, and ``gpu=False`` leaves the GPU
request out of the IR for CPU-only clusters.

Multi-node training is a compile-time choice too: with ``train_nodes > 1`` the ``train`` task
is replaced by ``train-trainjob`` (``components/trainjob``), a small CPU pod that runs the
training on a Kubeflow Trainer TrainJob of ``train_nodes`` GPU nodes (``coreg.trainjob``) and
outputs the same ``model`` artifact, so evaluate and register are unchanged. A compile-time
switch rather than ``dsl.If`` on a parameter: the model artifact of two branches could not be
merged in the local runner (see ``downstream``), and ``train_nodes=1`` (the default, and what
``coreg pipeline run --local`` uses) compiles exactly the single-node pipeline.
"""

from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Dataset
from pydantic import BaseModel, Field

from components.aggregate.component import aggregate
from components.annotate.component import annotate
from components.evaluate.component import evaluate
from components.image import component, current_image
from components.register.component import register
from components.train.component import train
from components.trainjob.component import train_trainjob

PIPELINE_NAME = "coreg"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class Toleration(BaseModel):
    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


class ClusterOptions(BaseModel):
    """Compile-time cluster settings of the pipeline's tasks."""

    image: str | None = Field(None, description="Image of every component; default: COREG_IMAGE or IMAGE.")
    gpu: bool = Field(True, description="Request GPUs for the train task (off for CPU-only clusters).")
    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 1
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    shm_size: str = Field("8Gi", description="Size of the memory-backed /dev/shm of the train task.")
    train_cpu: str = "4"
    train_memory: str = "16G"
    stage_cpu: str = "1"
    stage_memory: str = "4G"
    retries: int = Field(2, description="Retries of the train task, with exponential backoff (node loss, OOM).")
    stage_retries: int = Field(1, description="Retries of the other tasks (a flaky S3 or MLflow), with backoff.")
    s3_secret: str | None = Field("coreg-s3", description="Secret with AWS_* keys; None: no S3 env.")
    mlflow_secret: str | None = Field("coreg-mlflow", description="Secret with MLFLOW_* keys; None: none.")
    train_nodes: int = Field(1, ge=1, le=1024, description="Nodes of the training; > 1: a Kubeflow Trainer "
                             "TrainJob (train-trainjob task) instead of the in-pod train task.")
    train_procs_per_node: int | None = Field(
        None, ge=1, description="torchrun processes per TrainJob node; default: gpu_count (1 without GPUs).")
    trainjob_runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime of the TrainJob.")
    trainjob_namespace: str = Field("", description="Namespace of the TrainJob; empty: the pipeline run's.")
    trainjob_timeout_s: int = Field(7 * 24 * 3600, ge=1, description="Seconds the launcher waits for the TrainJob.")

    def trainjob_options(self, image: str) -> dict[str, Any]:
        """The TrainJob settings the train-trainjob task gets (validated by coreg.trainjob.TrainJobOptions)."""
        from coreg.trainjob import TrainJobOptions, validated

        gpus = self.gpu_count if self.gpu else 0
        options = validated(
            TrainJobOptions, "ClusterOptions (TrainJob)", num_nodes=self.train_nodes,
            procs_per_node=self.train_procs_per_node or max(gpus, 1), gpus_per_node=gpus,
            gpu_resource=self.gpu_type, cpu=self.train_cpu, memory=self.train_memory, image=image,
            runtime=self.trainjob_runtime, namespace=self.trainjob_namespace,
            tolerations=[t.model_dump() for t in self.tolerations] if self.gpu else [],
            node_selector=dict(self.node_selector) if self.gpu else {}, shm_size=self.shm_size,
            s3_secret=self.s3_secret, mlflow_secret=self.mlflow_secret, timeout_s=self.trainjob_timeout_s)
        return options.as_parameter()


def _with_secrets(task: Any, opts: ClusterOptions) -> Any:
    # optional=True: a cluster that lacks one key (e.g. no MLFLOW_TRACKING_PASSWORD) still runs.
    if opts.s3_secret:
        kubernetes.use_secret_as_env(task, opts.s3_secret, {k: k for k in S3_ENV}, optional=True)
    if opts.mlflow_secret:
        kubernetes.use_secret_as_env(task, opts.mlflow_secret, {k: k for k in MLFLOW_ENV}, optional=True)
    return task


def _stage_resources(task: Any, opts: ClusterOptions) -> Any:
    task.set_cpu_request(opts.stage_cpu).set_memory_request(opts.stage_memory)
    if opts.stage_retries:
        task.set_retry(num_retries=opts.stage_retries, backoff_duration="30s", backoff_factor=2)
    return task


def _train_resources(task: Any, opts: ClusterOptions) -> Any:
    task.set_cpu_request(opts.train_cpu).set_memory_request(opts.train_memory).set_memory_limit(opts.train_memory)
    if opts.retries:
        task.set_retry(num_retries=opts.retries, backoff_duration="60s", backoff_factor=2,
                       backoff_max_duration="3600s")
    if opts.gpu:
        task.set_accelerator_type(opts.gpu_type).set_accelerator_limit(opts.gpu_count)
        for tol in opts.tolerations:
            kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
        for key, value in opts.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    # DataLoader workers share batches through /dev/shm; the container default (64 MiB) is too small.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=opts.shm_size)
    return task


def _launcher_resources(task: Any, opts: ClusterOptions) -> Any:
    """The train-trainjob task: a small CPU pod; a retry attaches to the TrainJob it already created."""
    task.set_cpu_request(opts.stage_cpu).set_memory_request(opts.stage_memory)
    if opts.retries:
        task.set_retry(num_retries=opts.retries, backoff_duration="60s", backoff_factor=2,
                       backoff_max_duration="3600s")
    return task


def build_pipeline(options: ClusterOptions | None = None) -> Any:
    """A KFP pipeline function with the given cluster options baked in."""
    opts = options or ClusterOptions()
    image = opts.image or current_image()
    annotate_op, aggregate_op, train_op = component(annotate, image), component(aggregate, image), \
        component(train, image)
    evaluate_op, register_op = component(evaluate, image), component(register, image)
    trainjob_op = component(train_trainjob, image)
    trainjob_options = opts.trainjob_options(image) if opts.train_nodes > 1 else None

    @dsl.pipeline(name=PIPELINE_NAME, description="Train an image classifier without human labels (coreg), "
                  "track it in MLflow and promote it when it beats the champion.")
    def coreg_pipeline(
        config_yaml: str = "",
        overrides: list = [],  # noqa: B006 - KFP needs literal defaults
        data_uri: str = "",
        class_names: list = [],  # noqa: B006
        annotations_uri: str = "",
        tracking_uri: str = "",
        experiment: str = "coreg",
        model_name: str = "coreg",
        storage_uri: str = "",
    ) -> None:
        common = {
            "config_yaml": config_yaml, "overrides": overrides, "data_uri": data_uri, "class_names": class_names,
            "tracking_uri": tracking_uri, "experiment": experiment, "model_name": model_name,
            "storage_uri": storage_uri, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        }
        def downstream(annotations: Any) -> None:
            """aggregate -> train -> evaluate -> register on the given annotations.

            Built inside each branch: KFP's local runner cannot merge artifacts of If/Else
            branches (dsl.OneOf works there for parameters only), so each branch carries its own
            copy of the rest of the DAG. Exactly one branch runs.
            """
            aggregate_task = _with_secrets(_stage_resources(aggregate_op(annotations=annotations, **common), opts),
                                           opts)
            aggregate_task.set_display_name("aggregate")
            if trainjob_options is None:
                train_task = _with_secrets(_train_resources(
                    train_op(candidates=aggregate_task.outputs["candidates"], **common), opts), opts)
                train_task.set_display_name("train")
            else:  # multi-node: the same model output, trained by a TrainJob this task creates and follows
                train_task = _with_secrets(_launcher_resources(trainjob_op(
                    candidates=aggregate_task.outputs["candidates"], trainjob=trainjob_options, **common), opts),
                    opts)
                train_task.set_display_name(f"train-trainjob-{opts.train_nodes}-nodes")
            evaluate_task = _with_secrets(_stage_resources(evaluate_op(
                model=train_task.outputs["model"], annotations=annotations,
                candidates=aggregate_task.outputs["candidates"], **common), opts), opts)
            evaluate_task.set_display_name("evaluate")
            register_task = _with_secrets(_stage_resources(register_op(
                model=train_task.outputs["model"], evaluation=evaluate_task.outputs["evaluation"], **common), opts),
                opts)
            register_task.set_display_name("register-and-promote").set_caching_options(False)

        with dsl.If(annotations_uri == "", name="annotate-from-data"):
            annotate_task = _with_secrets(_stage_resources(annotate_op(**common), opts), opts)
            annotate_task.set_display_name("annotate")
            downstream(annotate_task.outputs["annotations"])
        with dsl.Else(name="start-from-annotations"):
            imported = dsl.importer(artifact_uri=annotations_uri, artifact_class=Dataset, reimport=False)
            imported.set_display_name("import-annotations")
            downstream(imported.output)

    return coreg_pipeline


coreg_pipeline = build_pipeline()


def compile_pipeline(package_path: str, options: ClusterOptions | None = None) -> str:
    """Write the pipeline's IR YAML to ``package_path``."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(options), package_path)
    return package_path
