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


def _zero_shot_stages(root):
    """Hand-made annotate and aggregate folders (3 classes, 4 annotators), then real zero-shot train and evaluate."""
    import pandas as pd

    from coreg import contracts
    from coreg.baselines.zero_shot import run_zero_shot
    from coreg.evaluate import run_evaluate
    from coreg.lineage import write_lineage

    ids = [f"s{i}" for i in range(12)]
    samples = pd.DataFrame({"sample_id": ids, "split": ["train"] * 6 + ["test"] * 6,
                            "label": [i % 3 for i in range(12)]})
    rows = [(sid, f"a{j}", (i % 3) if j < 3 - (i % 2) else (i + 1) % 3) for i, sid in enumerate(ids) for j in range(4)]
    annotations = pd.DataFrame(rows, columns=["sample_id", "annotator", "label"]).assign(probability=None, probs=None)
    annotate, aggregate = root / "annotate", root / "aggregate"
    for folder in (annotate, aggregate):
        folder.mkdir()
        contracts.write_classes(folder, ["a", "b", "c"])
        contracts.write_samples(folder, samples)
    contracts.write_annotations(annotate, annotations)
    contracts.write_candidates(aggregate, pd.DataFrame({"sample_id": ids, "candidates": [[i % 3] for i in range(12)],
                                                        "mean_probs": None}))
    write_lineage(aggregate, "aggregate", {"annotations": annotate})
    return annotate, aggregate, run_zero_shot, run_evaluate


def test_register_step_records_that_a_zero_shot_run_has_no_network(tmp_path, caplog):
    import logging

    import mlflow

    from coreg import steps

    uri = default_tracking_uri(tmp_path / "store")
    settings = StepSettings(overrides=["train.method=zero_shot", "evaluate.plots=false"], tracking_uri=uri,
                            experiment="unit", model_name="zs-model", kfp_run_id="kfp-zs")
    config = resolve(settings).config
    annotate, aggregate, run_zero_shot, run_evaluate = _zero_shot_stages(tmp_path)
    train = run_zero_shot(config, aggregate, tmp_path / "train")
    evaluate = run_evaluate(config, train, tmp_path / "evaluate", annotations_dir=annotate)
    steps.track(resolve(settings), settings, "evaluate", evaluate)

    decision_json, decision_md = tmp_path / "decision.json", tmp_path / "decision.md"
    with caplog.at_level(logging.INFO, logger="coreg.steps"):
        result = steps.register_step(settings, str(train), str(evaluate), str(decision_json), str(decision_md))

    reason = "not registered: train.method=zero_shot has no network"
    decision = json.loads(decision_json.read_text())
    assert decision["reason"] == reason and decision["promoted"] is False and decision["registered"] is False
    assert reason in decision_md.read_text()
    assert result["promoted"] is False and result["version"] == ""
    assert any(reason in r.getMessage() for r in caplog.records)
    # registry_uri too: an earlier test may have pointed the process-wide registry URI at another store.
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_model_versions("name = 'zs-model'") == []
    assert client.search_registered_models() == []
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["coreg.promoted"] == "false"
    assert run.data.metrics["test.model.accuracy"] == pytest.approx(5 / 6)  # the evaluate stage's metrics are there
    assert [a.path for a in client.list_artifacts(run.info.run_id, "registry")] == ["registry/decision.json"]
    assert not client.search_logged_models([run.info.experiment_id])  # no model logged to the run either
