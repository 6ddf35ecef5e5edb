"""The whole pipeline through KFP's local runner, against a real MLflow server and a real S3 server.

Run 1 (annotate -> aggregate -> train -> evaluate -> register) must produce one MLflow run
with params, per-epoch and test metrics, artifacts and a logged model; a registered
version with aliases challenger and champion; and every stage folder published in the
bucket. Run 2 starts from run 1's published annotations (annotate skipped) and trains a
deliberately worse model (one epoch at a vanishing learning rate): it is registered as
challenger but champion stays on run 1's version. Finally ``coreg predict`` labels a
folder of images with the champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
from PIL import Image

from coreg import pipeline_cli
from coreg.errors import CoregError
from coreg.registry import CHALLENGER, CHAMPION
from coreg.storage import MANIFEST
from coreg.tracking import KFP_RUN_TAG, TrackingConfig

pytestmark = pytest.mark.slow

MODEL = "digits-e2e"
EXPERIMENT = "e2e"
# Five warm-up epochs and one Co-Reg epoch: enough to beat a near-untrained model clearly, fast on 2 CPUs.
EPOCHS = 6
BASE = ["data.limit=300", f"train.epochs={EPOCHS}", "train.warmup_epochs=5", "train.rampup_epochs=1",
        "train.reg_start_offset=1", "evaluate.plots=true"]


def _params(mlflow_server, s3_server, overrides, annotations_uri=""):
    from coreg.config import DEFAULT_CONFIG

    return pipeline_cli.PipelineParams(
        config_yaml=DEFAULT_CONFIG.read_text(), overrides=overrides, annotations_uri=annotations_uri,
        tracking_uri=mlflow_server.uri, experiment=EXPERIMENT, model_name=MODEL,
        storage_uri=f"s3://{s3_server.bucket}/runs")


@pytest.fixture(scope="module")
def two_runs(mlflow_server, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfp")
    first = pipeline_cli.run_local(_params(mlflow_server, s3_server, BASE), root / "first")
    # registry_uri too: an earlier test may have pointed the process-wide registry URI at another store.
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run1,) = client.search_runs([exp.experiment_id])
    kfp_run_id = run1.data.tags[KFP_RUN_TAG]
    annotations_uri = f"s3://{s3_server.bucket}/runs/{kfp_run_id}/annotate"
    worse = [*BASE, "train.epochs=1", "train.warmup_epochs=1", "train.lr=1e-7", "train.validation_fraction=0"]
    second = pipeline_cli.run_local(_params(mlflow_server, s3_server, worse, annotations_uri), root / "second")
    second["run_dir_path"] = Path(second["run_dir"])
    return {"first": first, "second": second, "client": client, "experiment_id": exp.experiment_id,
            "kfp_run_id": kfp_run_id}


def test_first_run_is_tracked_in_mlflow(two_runs):
    client = two_runs["client"]
    (run,) = client.search_runs([two_runs["experiment_id"]],
                                filter_string=f"tags.{KFP_RUN_TAG} = '{two_runs['kfp_run_id']}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(EPOCHS) and run.data.params["data.limit"] == "300"
    assert run.data.tags["coreg.stages_done"] == "annotate,aggregate,train,evaluate"
    metrics = run.data.metrics
    assert 0.0 <= metrics["test.model.accuracy"] <= 1.0
    assert "annotate.noise_rate" in metrics and "aggregate.all.coverage" in metrics
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    val = client.get_metric_history(run.info.run_id, "train.val_hit_rate")
    assert sorted(m.step for m in val) == list(range(1, EPOCHS + 1))
    assert "train.clean_net1" in metrics
    artifacts = {f.path for d in ("evaluate", "train", "aggregate", "registry")
                 for f in client.list_artifacts(run.info.run_id, d)}
    assert {"evaluate/report.md", "evaluate/metrics.json", "evaluate/confusion_matrix.png",
            "evaluate/training_curves.png", "train/history.json", "aggregate/quality.md"} <= artifacts
    assert any(p.startswith("registry/") for p in artifacts)
    models = client.search_logged_models(experiment_ids=[two_runs["experiment_id"]])
    (model,) = [m for m in models if m.source_run_id == run.info.run_id]
    assert model.name == "model"
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{two_runs['first']['decision']['version']}")
    assert info.metadata["image_size"] == 16 and info.metadata["channels"] == 1
    assert len(info.metadata["class_names"]) == 10
    (tensor,) = info.signature.inputs.inputs
    assert list(tensor.shape) == [-1, 1, 16, 16]


def test_first_run_becomes_champion_and_second_does_not(two_runs):
    first, second = two_runs["first"]["decision"], two_runs["second"]["decision"]
    assert first["promoted"] is True and first["reason"] == "no champion yet"
    assert second["challenger_value"] < first["challenger_value"]  # really worse, not a tie
    assert second["promoted"] is False
    assert second["champion_version"] == first["version"]
    assert second["champion_value"] == pytest.approx(first["challenger_value"])
    client = two_runs["client"]
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == first["version"]
    assert client.get_model_version_by_alias(MODEL, CHALLENGER).version == second["version"]
    tags = client.get_model_version(MODEL, second["version"]).tags
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.champion_value"]) == pytest.approx(first["challenger_value"])
    assert float(tags["metric.accuracy"]) == pytest.approx(second["challenger_value"])


def test_second_run_skipped_annotate(two_runs):
    client = two_runs["client"]
    runs = client.search_runs([two_runs["experiment_id"]], order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["coreg.stages_done"] == "aggregate,train,evaluate"


def test_bucket_holds_published_stage_folders_and_mlflow_artifacts(two_runs, s3_server):
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket)
            for o in page.get("Contents", [])]
    prefix = f"runs/{two_runs['kfp_run_id']}"
    for stage in ("annotate", "aggregate", "train", "evaluate"):
        assert f"{prefix}/{stage}/{MANIFEST}" in keys, stage
    manifest = json.loads(s3.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/train/{MANIFEST}")["Body"].read())
    assert "model.pt" in {f["path"] for f in manifest["files"]}
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("report.md") for k in keys)


def _cli(*argv: str):
    import argparse

    parser = argparse.ArgumentParser(prog="coreg")
    pipeline_cli.register(parser.add_subparsers(dest="command", required=True))
    return pipeline_cli.dispatch(parser.parse_args(list(argv)))


def test_reevaluating_the_champion_reproduces_its_recorded_figure(two_runs, mlflow_server):
    """The path taken when the champion was evaluated on other data gives evaluate's own figure on same data."""
    from coreg.config import load_config
    from coreg.registry import evaluate_registered

    first = two_runs["first"]["decision"]
    train_dir = next(p for p in (two_runs["second"]["run_dir_path"]).glob("train*/model") if p.is_dir())
    config = load_config(None, BASE)
    cfg = TrackingConfig(uri=mlflow_server.uri, model_name=MODEL)
    value = evaluate_registered(cfg, f"models:/{MODEL}/{first['version']}", config, train_dir, "accuracy")
    assert value == pytest.approx(first["challenger_value"])


def test_predict_labels_a_folder_with_the_champion(two_runs, mlflow_server, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / "sub" / f"{i}.png")
    out = _cli("predict", "--images", str(folder), "--out", str(tmp_path / "pred.parquet"),
               "--tracking-uri", mlflow_server.uri, "--model-name", MODEL)
    import pandas as pd

    table = pd.read_parquet(out)
    assert list(table.columns) == ["path", "label", "class_name", "confidence"]
    assert sorted(table["path"]) == [f"sub/{i}.png" for i in range(5)]
    assert set(table["class_name"]) <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                        "nine"}
    assert ((table["confidence"] > 0) & (table["confidence"] <= 1)).all()


def test_promote_command_applies_the_rule_then_forces(two_runs, mlflow_server, tmp_path):
    first, second = two_runs["first"]["decision"], two_runs["second"]["decision"]
    common = ["--tracking-uri", mlflow_server.uri, "--model-name", MODEL]
    out = _cli("promote", "--version", second["version"], *common, "--out", str(tmp_path / "rule.json"))
    assert json.loads(out.read_text())["promoted"] is False
    client = two_runs["client"]
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == first["version"]
    _cli("promote", "--version", second["version"], "--force", *common, "--out", str(tmp_path / "force.json"))
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == second["version"]
    with pytest.raises(CoregError, match="version 99"):
        _cli("promote", "--version", "99", *common, "--out", str(tmp_path / "none.json"))


def test_zero_shot_pipeline_evaluates_the_votes_and_registers_nothing(mlflow_server, s3_server, tmp_path):
    """``train.method=zero_shot`` through the same pipeline: evaluate scores the votes, register declines."""
    from coreg.baselines.zero_shot import NOT_REGISTERED_REASON, ZERO_SHOT_FILE, zero_shot_accuracy

    name, experiment = "digits-zero-shot", "e2e-zero-shot"
    params = _params(mlflow_server, s3_server, ["data.limit=300", "train.method=zero_shot", "evaluate.plots=false"])
    params = params.model_copy(update={"experiment": experiment, "model_name": name})
    summary = pipeline_cli.run_local(params, tmp_path / "kfp")
    assert summary["decision"]["reason"] == NOT_REGISTERED_REASON and summary["decision"]["promoted"] is False
    run_dir = Path(summary["run_dir"])
    (train,) = {p.parent for p in run_dir.glob(f"train*/**/{ZERO_SHOT_FILE}")}
    (metrics_file,) = run_dir.glob("evaluate*/**/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["model"]["accuracy"] == pytest.approx(zero_shot_accuracy(train))
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["coreg.promoted"] == "false"
    assert run.data.tags["coreg.stages_done"] == "annotate,aggregate,train,evaluate"
    assert run.data.metrics["test.model.accuracy"] == pytest.approx(metrics["model"]["accuracy"])
    assert client.search_model_versions(f"name = '{name}'") == []
