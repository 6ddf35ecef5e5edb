"""The compiled pipeline IR: images, GPU request, tolerations, /dev/shm, secrets, the skip-annotate branch.

The YAML is parsed into KFP's own protobuf messages (PipelineSpec, and the Kubernetes
platform spec into KubernetesExecutorConfig), so the assertions read what a KFP backend reads.
"""

from __future__ import annotations

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from coreg import pipeline_cli

IMAGE = "registry.example.com/coreg:test"
STAGES = ("annotate", "aggregate", "train", "evaluate", "register")


def _compile(tmp_path, monkeypatch, *args: str):
    monkeypatch.setenv("COREG_IMAGE", IMAGE)
    out = tmp_path / "pipeline.yaml"
    parser = _parser()
    assert pipeline_cli.dispatch(parser.parse_args(["pipeline", "compile", "--out", str(out), *args])) == out
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    k8s = {name: json_format.ParseDict(cfg, k8s_pb2.KubernetesExecutorConfig()) for name, cfg in platform.items()}
    return spec, k8s


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="coreg")
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline_cli.register(sub)
    return parser


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    return _compile(tmp_path, monkeypatch)


def test_every_executor_runs_the_project_image_without_installing(compiled):
    spec, _ = compiled
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    containers = {name: ex.struct_value.fields["container"].struct_value for name, ex in executors.items()
                  if "container" in ex.struct_value.fields}
    # Each If/Else branch carries its own aggregate..register tasks (exec-train and exec-train-2, ...).
    assert {name.removesuffix("-2") for name in containers} == {f"exec-{s}" for s in STAGES}
    for name, container in containers.items():
        assert container.fields["image"].string_value == IMAGE, name
        command = " ".join(v.string_value for v in container.fields["command"].list_value.values)
        assert "pip install" not in command, name
    importers = [name for name, ex in executors.items() if "importer" in ex.struct_value.fields]
    assert importers == ["exec-importer"]


def _all_tasks(spec) -> dict:
    return {name: task for comp in [spec.root, *spec.components.values()] for name, task in comp.dag.tasks.items()}


@pytest.mark.parametrize("train", ["exec-train", "exec-train-2"])
def test_train_requests_a_gpu_with_resources_and_retries(compiled, train):
    spec, _ = compiled
    executor = spec.deployment_spec.fields["executors"].struct_value.fields[train].struct_value
    resources = executor.fields["container"].struct_value.fields["resources"].struct_value.fields
    accelerator = resources["accelerator"].struct_value.fields
    assert accelerator["resourceType"].string_value == "nvidia.com/gpu"
    assert accelerator["resourceCount"].string_value == "1"
    assert resources["resourceCpuRequest"].string_value == "4"
    assert resources["resourceMemoryRequest"].string_value == "16G"
    tasks = _all_tasks(spec)
    assert tasks[train.removeprefix("exec-")].retry_policy.max_retry_count == 2
    assert tasks["register"].caching_options.enable_cache is False
    assert tasks["register-2"].caching_options.enable_cache is False


@pytest.mark.parametrize("train", ["exec-train", "exec-train-2"])
def test_train_has_toleration_node_selector_and_memory_shm(compiled, train):
    _, k8s = compiled
    train = k8s[train]
    assert [(t.key, t.operator, t.effect) for t in train.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert dict(train.node_selector.labels) == {"nvidia.com/gpu.present": "true"}
    (shm,) = train.empty_dir_mounts
    assert (shm.mount_path, shm.medium, shm.size_limit) == ("/dev/shm", "Memory", "8Gi")


def test_every_stage_gets_s3_and_mlflow_secrets_as_env(compiled):
    _, k8s = compiled
    assert {name.removesuffix("-2") for name in k8s} == {f"exec-{s}" for s in STAGES}
    for executor, config in k8s.items():
        secrets = {s.secret_name: {e.env_var for e in s.key_to_env} for s in config.secret_as_env}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= secrets["coreg-s3"], executor
        assert "MLFLOW_TRACKING_URI" in secrets["coreg-mlflow"], executor


def test_annotate_is_skipped_when_annotations_are_given(compiled):
    spec, _ = compiled
    (group,) = spec.root.dag.tasks
    branches = spec.components[spec.root.dag.tasks[group].component_ref.name].dag.tasks
    by_condition = {branches[b].trigger_policy.condition: set(spec.components[branches[b].component_ref.name]
                                                                 .dag.tasks) for b in branches}
    assert len(by_condition) == 2 and all("annotations_uri" in c for c in by_condition)
    with_annotate = next(tasks for cond, tasks in by_condition.items() if not cond.startswith("!("))
    from_import = next(tasks for cond, tasks in by_condition.items() if cond.startswith("!("))
    assert with_annotate == {"annotate", "aggregate", "train", "evaluate", "register"}
    assert from_import == {"importer", "aggregate-2", "train-2", "evaluate-2", "register-2"}
    branch = spec.components[next(branches[b].component_ref.name for b in branches
                                  if branches[b].trigger_policy.condition.startswith("!("))]
    agg_input = branch.dag.tasks["aggregate-2"].inputs.artifacts["annotations"].task_output_artifact
    assert agg_input.producer_task == "importer"
    inputs = spec.root.input_definitions.parameters
    assert {"config_yaml", "overrides", "data_uri", "class_names", "annotations_uri", "tracking_uri",
            "storage_uri", "model_name", "experiment"} <= set(inputs)


def test_gpu_settings_can_be_switched_off(tmp_path, monkeypatch):
    spec, k8s = _compile(tmp_path, monkeypatch, "--no-gpu")
    train = spec.deployment_spec.fields["executors"].struct_value.fields["exec-train"].struct_value
    resources = train.fields["container"].struct_value.fields["resources"].struct_value.fields
    assert "accelerator" not in resources
    assert not k8s["exec-train"].tolerations
    assert k8s["exec-train"].empty_dir_mounts  # /dev/shm still helps DataLoader workers on CPU


def test_default_pipeline_trains_in_pod_without_a_trainjob(compiled):
    spec, _ = compiled
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    assert not [name for name in executors if "trainjob" in name]
    assert {"train", "train-2"} <= set(_all_tasks(spec))


@pytest.mark.parametrize("suffix", ["", "-2"])
def test_train_nodes_swaps_train_for_the_trainjob_launcher(tmp_path, monkeypatch, suffix):
    spec, k8s = _compile(tmp_path, monkeypatch, "--train-nodes", "3", "--gpu-count", "2")
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    assert f"exec-train-trainjob{suffix}" in executors and f"exec-train{suffix}" not in executors
    tasks = _all_tasks(spec)
    launcher = tasks[f"train-trainjob{suffix}"]
    assert f"train{suffix}" not in tasks
    # evaluate and register read the launcher's model, exactly as they read train's.
    for consumer in (f"evaluate{suffix}", f"register{suffix}"):
        model = tasks[consumer].inputs.artifacts["model"].task_output_artifact
        assert model.producer_task == f"train-trainjob{suffix}"
    # The TrainJob settings are a compile-time constant: 3 nodes x 2 GPUs, one process per GPU.
    options = json_format.MessageToDict(launcher.inputs.parameters["trainjob"].runtime_value.constant)
    assert (options["num_nodes"], options["gpus_per_node"], options["procs_per_node"]) == (3, 2, 2)
    assert options["image"] == IMAGE and options["runtime"] == "torch-distributed"
    assert options["cpu"] == "4" and options["memory"] == "16G"
    from coreg.trainjob import TrainJobOptions

    TrainJobOptions(**options)  # what the task will validate at run time
    # The launcher is a small CPU pod with retries (a retry attaches to the TrainJob) and the secrets.
    container = executors[f"exec-train-trainjob{suffix}"].struct_value.fields["container"].struct_value
    assert container.fields["image"].string_value == IMAGE
    resources = container.fields["resources"].struct_value.fields
    assert "accelerator" not in resources and resources["resourceCpuRequest"].string_value == "1"
    assert launcher.retry_policy.max_retry_count == 2
    config = k8s[f"exec-train-trainjob{suffix}"]
    assert not config.tolerations and not config.empty_dir_mounts
    assert {s.secret_name for s in config.secret_as_env} == {"coreg-s3", "coreg-mlflow"}


def test_train_nodes_must_be_positive(tmp_path, monkeypatch):
    from coreg.errors import CoregError

    with pytest.raises(CoregError, match="--train-nodes 0"):
        _compile(tmp_path, monkeypatch, "--train-nodes", "0")
