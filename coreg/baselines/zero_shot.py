"""Zero-shot baseline: the annotators' plurality vote, no network.

Decision: zero-shot needs no trained model, so ``coreg train`` with ``train.method=zero_shot`` writes
``zero_shot_predictions.parquet`` (sample_id, split, prediction for every sample) and ``train_summary.json``,
and no ``model.pt``. The rest of the pipeline still applies: ``coreg evaluate`` recognises such a folder
(:func:`is_zero_shot_folder`) and evaluates the votes of the test split instead of a network (same
``metrics.json``, ``predictions.parquet`` with the share of agreeing annotators as confidence, report and
confusion matrix; no training curves), and the pipeline's register step records "not registered:
train.method=zero_shot has no network" as its decision instead of registering a model. The accuracy equals
``zero_shot.plurality_vote_accuracy`` of any trained run's evaluation, and :func:`zero_shot_accuracy`
computes it from the prediction file for the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coreg import contracts
from coreg.atomic import atomic_path, write_json
from coreg.baselines.targets import majority_labels
from coreg.config import RunConfig, save_config
from coreg.errors import CoregError
from coreg.lineage import read_input, write_lineage

ZERO_SHOT_FILE = "zero_shot_predictions.parquet"
NOT_REGISTERED_REASON = "not registered: train.method=zero_shot has no network"


def is_zero_shot_folder(train_dir: Path) -> bool:
    """Whether ``train_dir`` is a zero-shot train folder: the vote file and no ``model.pt``."""
    train_dir = Path(train_dir)
    return (train_dir / ZERO_SHOT_FILE).is_file() and not (train_dir / "model.pt").is_file()


def zero_shot_votes(annotations_dir: Path, samples: pd.DataFrame, num_classes: int) -> np.ndarray:
    """Plurality vote of the annotators for every row of ``samples``."""
    annotations = contracts.read_annotations(annotations_dir, num_classes)
    return majority_labels(annotations, list(samples["sample_id"]), num_classes,
                           str(annotations_dir / contracts.ANNOTATIONS_FILE))


def run_zero_shot(config: RunConfig, candidates_dir: Path, out_dir: Path) -> Path:
    """Write the plurality-vote predictions of every sample (train and test) into ``out_dir``."""
    candidates_dir, out_dir = Path(candidates_dir), Path(out_dir)
    class_names = contracts.read_classes(candidates_dir)
    samples = contracts.read_samples(candidates_dir)
    annotations_dir = read_input(candidates_dir, "annotations")
    if annotations_dir is None:
        raise CoregError(f"{candidates_dir}: lineage.json names no annotations folder; zero_shot needs the "
                         "annotators' answers")
    pred = zero_shot_votes(annotations_dir, samples, len(class_names))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.pt").unlink(missing_ok=True)  # never leave an older run's network next to these votes
    save_config(config, out_dir)
    write_lineage(out_dir, "train", {"candidates": candidates_dir, "annotations": annotations_dir})
    contracts.write_classes(out_dir, class_names)
    contracts.write_samples(out_dir, samples)
    with atomic_path(out_dir / ZERO_SHOT_FILE) as tmp:
        pd.DataFrame({"sample_id": samples["sample_id"], "split": samples["split"],
                      "prediction": pred.astype(np.int64)}).to_parquet(tmp, index=False)
    labels = samples["label"].to_numpy()
    test = (samples["split"] == "test").to_numpy() & (labels >= 0)
    write_json(out_dir / "train_summary.json", {
        "method": "zero_shot", "epochs_done": 0, "selected_epoch": None,
        "test_accuracy": float(np.mean(pred[test] == labels[test])) if test.any() else None,
    })
    return out_dir


def zero_shot_accuracy(train_dir: Path) -> float | None:
    """Test accuracy of the votes written by :func:`run_zero_shot` (None without labelled test samples)."""
    preds = pd.read_parquet(Path(train_dir) / ZERO_SHOT_FILE)
    samples = contracts.read_samples(Path(train_dir))
    merged = preds.merge(samples[["sample_id", "label"]], on="sample_id")
    test = merged[(merged["split"] == "test") & (merged["label"] >= 0)]
    return float((test["prediction"] == test["label"]).mean()) if len(test) else None
