"""Baselines (coreg.baselines): each learns a tiny separable case and keeps the model.pt contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_trainer import K, make_images, noisy_candidates

from coreg.baselines import fit_dividemix, fit_proden, fit_soft_targets, one_hot
from coreg.baselines.dividemix import dividemix_config
from coreg.baselines.targets import majority_labels, soft_targets
from coreg.baselines.zero_shot import ZERO_SHOT_FILE, zero_shot_accuracy
from coreg.cli import main
from coreg.config import TrainConfig
from coreg.errors import CoregError
from coreg.train import load_trained, predict_logits

CHANCE = 1 / K


def config(**overrides: object) -> TrainConfig:
    base = {"backbone": "small_cnn", "epochs": 6, "warmup_epochs": 2, "rampup_epochs": 2, "reg_start_offset": 1,
            "batch_size": 32, "warmup_batch_size": 32, "eval_batch_size": 128, "queue_size": 64, "proj_hidden": 64,
            "proj_dim": 32, "lr": 0.02, "device": "cpu", "seed": 3}
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = make_images(200, seed=10)
    cand = noisy_candidates(y, q=0.3, eta=0.2, seed=11)
    # Annotator top-1: right 75% of the time, otherwise a random class (noisy hard labels).
    rng = np.random.default_rng(12)
    top1 = np.where(rng.random(len(y)) < 0.75, y, rng.integers(0, K, len(y)))
    soft = 0.5 * one_hot(top1, K) + 0.5 / K
    x_val, y_val = make_images(60, seed=13)
    x_test, y_test = make_images(200, seed=14)
    return {"x": x, "y": y, "cand": cand, "top1": one_hot(top1, K), "soft": soft, "x_val": x_val,
            "cand_val": noisy_candidates(y_val, 0.3, 0.1, 15), "x_test": x_test, "y_test": y_test}


def _test_accuracy(model_path: Path, data: dict[str, np.ndarray]) -> float:
    model = load_trained(model_path)  # the contract: coreg evaluate loads every trained baseline this way
    logits = predict_logits(model, data["x_test"])
    assert logits.shape == (len(data["y_test"]), K)
    return float((logits.argmax(1) == data["y_test"]).mean())


@pytest.mark.parametrize("target", ["top1", "soft"])
def test_supervised_baselines_learn_and_write_a_loadable_model(tmp_path: Path, data: dict, target: str) -> None:
    cfg = config()
    result = fit_soft_targets(data["x"], data[target], data["cand"], cfg, tmp_path, horizontal_flip=False,
                              val_images=data["x_val"], val_candidates=data["cand_val"])
    assert _test_accuracy(result.model_path, data) > CHANCE + 0.35
    assert len(result.history) == cfg.epochs and (tmp_path / "history.json").is_file()
    assert result.best_epoch is not None and result.best_epoch >= cfg.first_selectable_epoch()
    model = load_trained(result.model_path)
    for a, b in zip(model.net1.state_dict().values(), model.net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # one net stored twice


def test_proden_learns_from_candidate_sets(tmp_path: Path, data: dict) -> None:
    result = fit_proden(data["x"], data["cand"], config(), tmp_path, horizontal_flip=False,
                        val_images=data["x_val"], val_candidates=data["cand_val"])
    assert _test_accuracy(result.model_path, data) > CHANCE + 0.35


def test_proden_is_seeded(tmp_path: Path, data: dict) -> None:
    cfg = config(epochs=2, warmup_epochs=0, rampup_epochs=1, reg_start_offset=0)
    a = fit_proden(data["x"], data["cand"], cfg, tmp_path / "a", horizontal_flip=False)
    b = fit_proden(data["x"], data["cand"], cfg, tmp_path / "b", horizontal_flip=False)
    wa, wb = torch.load(a.model_path, weights_only=True), torch.load(b.model_path, weights_only=True)
    assert all(torch.equal(wa["net1"][k], wb["net1"][k]) for k in wa["net1"])


def test_dividemix_learns_from_majority_labels(tmp_path: Path, data: dict) -> None:
    cfg = config(epochs=7, warmup_epochs=4, lr=0.01)
    result = fit_dividemix(data["x"], data["top1"], cfg, tmp_path, horizontal_flip=False,
                           val_images=data["x_val"], val_candidates=data["cand_val"])
    assert _test_accuracy(result.model_path, data) > CHANCE + 0.35
    assert all(not row["regularisers"] for row in result.history)  # no L_proto / L_con in the baseline
    assert result.best_epoch is not None and result.best_epoch >= cfg.first_selectable_epoch()


def test_dividemix_config_keeps_the_selection_rule() -> None:
    cfg = config(epochs=30, warmup_epochs=5, rampup_epochs=4, reg_start_offset=8)
    dm = dividemix_config(cfg)
    assert dm.first_selectable_epoch() == cfg.first_selectable_epoch() == 14
    assert dm.reg_start_offset + dm.warmup_epochs >= dm.epochs


def test_majority_labels_break_ties_to_the_lower_class() -> None:
    ann = pd.DataFrame({"sample_id": ["a", "a", "b", "b", "b", "c"], "annotator": ["p0", "p1", "p0", "p1", "p2", "p0"],
                        "label": [2, 1, 3, 3, 0, 1]})
    assert majority_labels(ann, ["a", "b", "c"], 4).tolist() == [1, 3, 1]
    with pytest.raises(CoregError, match="no annotation"):
        majority_labels(ann, ["a", "d"], 4)


def test_soft_targets_need_probabilities() -> None:
    cands = pd.DataFrame({"sample_id": ["a", "b"], "candidates": [[0], [1]],
                          "mean_probs": [[0.6, 0.2, 0.2], None], "few_shot": [False, False]})
    assert np.allclose(soft_targets(cands, ["a"], 3, "x")[0], [0.6, 0.2, 0.2])
    with pytest.raises(CoregError, match="mean_probs"):
        soft_targets(cands, ["a", "b"], 3, "x")


# ----------------------------------------------------------------------------- through the stages

TINY = ["data.limit=300", "data.image_size=8", "annotate.num_annotators=5", "train.backbone=small_cnn",
        "train.epochs=2", "train.warmup_epochs=1", "train.rampup_epochs=1", "train.reg_start_offset=0",
        "train.batch_size=32", "train.warmup_batch_size=32", "train.queue_size=64", "train.device=cpu",
        "evaluate.plots=false"]


def _args(out: Path, *extra: str) -> list[str]:
    args = ["--quiet", "--set", f"output_dir={out}"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    assert main(["annotate", *_args(root)]) == 0
    assert main(["aggregate", *_args(root)]) == 0
    return root


@pytest.mark.parametrize("method", ["ce_majority", "soft_distill", "proden", "dividemix"])
def test_train_stage_dispatches_and_evaluate_works_unchanged(aggregated: Path, tmp_path: Path, method: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    train, evaluate = tmp_path / "train", tmp_path / "evaluate"
    args = _args(aggregated, f"train.method={method}")
    assert main(["train", *args, "--candidates", str(aggregated / "aggregate"), "--out", str(train)]) == 0, \
        capsys.readouterr().err
    summary = json.loads((train / "train_summary.json").read_text())
    assert summary["method"] == method and summary["epochs_done"] == 2
    assert main(["evaluate", *args, "--model", str(train), "--out", str(evaluate)]) == 0, capsys.readouterr().err
    metrics = json.loads((evaluate / "metrics.json").read_text())
    assert 0.0 <= metrics["model"]["accuracy"] <= 1.0


def test_zero_shot_needs_no_network(aggregated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train"
    args = _args(aggregated, "train.method=zero_shot")
    assert main(["train", *args, "--candidates", str(aggregated / "aggregate"), "--out", str(train)]) == 0, \
        capsys.readouterr().err
    assert not (train / "model.pt").exists()
    preds = pd.read_parquet(train / ZERO_SHOT_FILE)
    samples = pd.read_parquet(aggregated / "annotate" / "samples.parquet")
    assert len(preds) == len(samples)
    # Same figure as coreg evaluate's zero_shot.plurality_vote_accuracy of a trained run.
    from coreg.evaluate import annotator_accuracy
    ann = pd.read_parquet(aggregated / "annotate" / "annotations.parquet")
    test = samples[samples["split"] == "test"].reset_index(drop=True)
    expected = annotator_accuracy(ann, test["sample_id"], test["label"].to_numpy(), 10)["plurality_vote_accuracy"]
    assert zero_shot_accuracy(train) == pytest.approx(expected)
    assert zero_shot_accuracy(train) > 0.1 + 0.2  # the simulated annotators beat chance (10 classes)


@pytest.fixture(scope="module")
def zero_shot_train(aggregated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = tmp_path_factory.mktemp("zero_shot") / "train"
    args = _args(aggregated, "train.method=zero_shot")
    assert main(["train", *args, "--candidates", str(aggregated / "aggregate"), "--out", str(train)]) == 0
    return train


def test_evaluate_scores_the_zero_shot_votes(aggregated: Path, zero_shot_train: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    evaluate = tmp_path / "evaluate"
    args = _args(aggregated, "train.method=zero_shot", "evaluate.plots=true")
    assert main(["evaluate", *args, "--model", str(zero_shot_train), "--out", str(evaluate)]) == 0, \
        capsys.readouterr().err
    metrics = json.loads((evaluate / "metrics.json").read_text())
    accuracy = zero_shot_accuracy(zero_shot_train)
    assert metrics["model"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["zero_shot"]["plurality_vote_accuracy"] == pytest.approx(accuracy)
    assert metrics["selected_epoch"] is None and metrics["candidates"]["coverage"] is not None
    assert metrics["figures"] == ["confusion_matrix.png"]  # no history, so no training curves
    assert not (evaluate / "training_curves.png").exists()
    assert "zero-shot plurality vote" in (evaluate / "report.md").read_text()

    preds = pd.read_parquet(evaluate / "predictions.parquet")
    samples = pd.read_parquet(zero_shot_train / "samples.parquet")
    test_ids = list(samples.loc[samples["split"] == "test", "sample_id"])
    assert list(preds.columns) == ["sample_id", "prediction", "class_name", "confidence"]
    assert list(preds["sample_id"]) == test_ids
    assert preds["prediction"].dtype == np.int64 and preds["confidence"].dtype == np.float32
    votes = pd.read_parquet(zero_shot_train / ZERO_SHOT_FILE).set_index("sample_id")["prediction"]
    assert (preds["prediction"].to_numpy() == votes.loc[test_ids].to_numpy()).all()
    names = json.loads((zero_shot_train / "classes.json").read_text())["class_names"]
    assert list(preds["class_name"]) == [names[p] for p in preds["prediction"]]
    # Confidence: the share of the sample's annotators whose top-1 is the predicted class.
    ann = pd.read_parquet(aggregated / "annotate" / "annotations.parquet")
    merged = ann.merge(preds[["sample_id", "prediction"]], on="sample_id")
    share = (merged["label"] == merged["prediction"]).groupby(merged["sample_id"]).mean().loc[test_ids]
    np.testing.assert_allclose(preds["confidence"].to_numpy(), share.to_numpy(), atol=1e-6)
    assert ((preds["confidence"] > 0) & (preds["confidence"] <= 1)).all()


def test_evaluate_without_model_or_votes_is_one_line_error(aggregated: Path, zero_shot_train: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    bare = tmp_path / "train"
    shutil.copytree(zero_shot_train, bare)
    (bare / ZERO_SHOT_FILE).unlink()
    out = tmp_path / "evaluate"
    assert main(["evaluate", *_args(aggregated), "--model", str(bare), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bare}: no model.pt and no {ZERO_SHOT_FILE}" in err
    assert not out.exists()
