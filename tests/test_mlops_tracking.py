"""coreg.tracking and coreg.steps without a pipeline: naming, the embedded store, settings, errors."""

from __future__ import annotations

import json

import pytest
from servers import free_port

from coreg.errors import CoregError
from coreg.steps import StepSettings, resolve
from coreg.tracking import (
    TrackingConfig,
    default_tracking_uri,
    flatten,
    history_metrics,
    log_stage,
    stage_metrics,
    start_or_resume_run,
)


def test_flatten_makes_dotted_string_safe_params():
    flat = flatten({"train": {"epochs": 3, "temperature_range": [0.5, 2.0]}, "data": {"path": None}})
    assert flat == {"train.epochs": 3, "train.temperature_range": "[0.5, 2.0]", "data.path": "null"}


def test_history_becomes_per_epoch_metrics():
    rows = history_metrics([{"epoch": 1, "loss": 2.0, "clean_net1": None, "phase": "warmup", "regularisers": False},
                            {"epoch": 2, "loss": 1.5, "clean_net1": 40, "val_hit_rate": 0.5}])
    assert rows == [(1, {"train.loss": 2.0}),
                    (2, {"train.loss": 1.5, "train.clean_net1": 40.0, "train.val_hit_rate": 0.5})]


def test_train_summary_names_selected_epoch(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(
        [{"epoch": 1, "val_hit_rate": 0.4}, {"epoch": 2, "val_hit_rate": 0.7}, {"epoch": 3, "val_hit_rate": 0.6}]))
    metrics = stage_metrics("train", tmp_path)
    assert metrics["train.selected_epoch"] == 2 and metrics["train.best_val_hit_rate"] == 0.7
    assert metrics["train.final.val_hit_rate"] == 0.6


def test_embedded_default_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"


def test_stage_logging_into_the_embedded_store(tmp_path):
    cfg = TrackingConfig(uri=default_tracking_uri(tmp_path / "store"), experiment="unit")
    run_id = start_or_resume_run(cfg, "kfp-123", {"train": {"epochs": 2}})
    assert start_or_resume_run(cfg, "kfp-123", {"train": {"epochs": 2}}) == run_id  # found again by its tag
    stage = tmp_path / "train"
    stage.mkdir()
    (stage / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]))
    log_stage(cfg, run_id, "train", stage)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2" and run.data.tags["kfp_run_id"] == "kfp-123"
    assert [m.value for m in client.get_metric_history(run_id, "train.loss")] == [1.0, 0.5]
    assert [a.path for a in client.list_artifacts(run_id, "train")] == ["train/history.json"]
    assert (tmp_path / "store" / "artifacts").is_dir()


def test_unreachable_tracking_server_is_one_line_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(CoregError, match=r"MLflow at http://127\.0\.0\.1") as err:
        start_or_resume_run(cfg, "kfp-x")
    assert "\n" not in str(err.value)


def test_settings_resolve_sections_and_explicit_parameters():
    yaml_text = "data:\n  source: digits\ntracking:\n  experiment: from-yaml\n  promotion_margin: 0.02\n" \
                "storage:\n  uri: s3://b/p\n"
    resolved = resolve(StepSettings(config_yaml=yaml_text, overrides=["train.epochs=7", "train.warmup_epochs=1"],
                                    model_name="explicit", class_names=[]))
    assert resolved.config.train.epochs == 7
    assert resolved.tracking.experiment == "from-yaml" and resolved.tracking.promotion_margin == 0.02
    assert resolved.tracking.model_name == "explicit"
    assert resolved.storage.uri == "s3://b/p"


def test_bad_tracking_field_names_the_field():
    with pytest.raises(CoregError, match=r"tracking\.promotion_metric"):
        resolve(StepSettings(config_yaml="tracking:\n  promotion_metric: f1\n"))
