"""Evaluate stage: test accuracy of the trained model beside the annotators' own accuracy.

The test split's ground truth is read here and only here; training and model selection
never see it. The report puts the model next to the zero-shot annotators on the very same
test samples, because "does distillation beat the VLM that labelled the data?" is the
question every user asks first.

A ``train.method=zero_shot`` folder (``zero_shot_predictions.parquet``, no ``model.pt``) has
no network: its predictions are the annotators' plurality votes of the test split, evaluated
the same way (same ``metrics.json`` and ``predictions.parquet``; ``confidence`` is the share
of the sample's annotators whose top-1 is the predicted class; no training curves).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from coreg import contracts
from coreg.atomic import atomic_path, staged_directory, write_json, write_text
from coreg.baselines.zero_shot import ZERO_SHOT_FILE, is_zero_shot_folder
from coreg.config import RunConfig, save_config
from coreg.data import load_dataset
from coreg.errors import CoregError
from coreg.lineage import read_input, write_lineage
from coreg.train import load_trained, predict_logits
from coreg.train.trainer import resolve_device

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FILE = "predictions.parquet"
MODEL_FILE = "model.pt"


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: truth)."""
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(k))
    support = cm.sum(axis=1)
    per_class = {
        name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else None,
        "n": len(y_true),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }


def annotator_accuracy(
    annotations: pd.DataFrame, sample_ids: pd.Series, y_true: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Zero-shot accuracy of each annotator, of annotator 0 and of the plurality vote.

    Only samples every figure can be computed on are used: those in ``sample_ids`` with
    a known label. An annotator that skipped a sample counts as wrong on it, so an
    annotator cannot look better by answering less.
    """
    from coreg.aggregate import plurality_vote

    position = pd.Series(np.arange(len(sample_ids)), index=sample_ids.to_numpy())
    rows = annotations[annotations["sample_id"].isin(position.index)]
    idx = position.loc[rows["sample_id"]].to_numpy()
    correct = rows["label"].to_numpy() == y_true[idx]
    per_annotator = (
        pd.Series(correct, index=rows["annotator"].to_numpy()).groupby(level=0).sum() / len(sample_ids)
    )
    annotators = sorted(annotations["annotator"].unique())
    votes = plurality_vote(rows.assign(_row=idx), num_classes, n_samples=len(sample_ids))
    return {
        "first_annotator": annotators[0] if annotators else None,
        "first_annotator_accuracy": float(per_annotator.get(annotators[0], 0.0)) if annotators else None,
        "plurality_vote_accuracy": float(np.mean(votes == y_true)),
        "mean_annotator_accuracy": float(per_annotator.mean()) if len(per_annotator) else None,
        "best_annotator_accuracy": float(per_annotator.max()) if len(per_annotator) else None,
        "per_annotator_accuracy": {str(k): float(v) for k, v in per_annotator.items()},
    }


def candidate_quality(candidates: pd.DataFrame, sample_ids: pd.Series, y_true: np.ndarray) -> dict[str, Any]:
    """Coverage (true label in the set) and mean set size of the candidate sets on the test split."""
    sets = candidates.set_index("sample_id")["candidates"].reindex(sample_ids.to_numpy())
    known = sets.notna().to_numpy()
    covered = [int(y) in set(s) for s, y in zip(sets[known], y_true[known], strict=True)]
    sizes = [len(s) for s in sets[known]]
    return {
        "coverage": float(np.mean(covered)) if covered else None,
        "mean_set_size": float(np.mean(sizes)) if sizes else None,
    }


def render_report(metrics: dict[str, Any], class_names: list[str], zero_shot: bool = False) -> str:
    """A short Markdown report: headline table, per-class table, figures.

    ``zero_shot``: the predictions are the annotators' plurality vote (``train.method=zero_shot``), no network.
    """
    lines = ["# coreg evaluation report", ""]
    model = metrics["model"]
    zs = metrics.get("zero_shot") or {}
    if model.get("accuracy") is None:
        lines += ["The test split has no ground-truth labels: predictions are in "
                  f"`{PREDICTIONS_FILE}`, no accuracy can be computed.", ""]
        return "\n".join(lines)
    if zero_shot:
        selection = ("Zero-shot baseline (`train.method=zero_shot`): no network was trained; the prediction is "
                     "the annotators' plurality vote (ties to the lower class index).")
        headline = "**zero-shot plurality vote (train.method=zero_shot)**"
    else:
        selection = (f"Model selected at epoch {metrics.get('selected_epoch')} by the held-out candidate hit rate "
                     "(test labels are never used for selection).")
        headline = "**Co-Reg (ensemble of both networks)**"
    lines += [
        f"Test samples with ground truth: **{model['n']}**. {selection}",
        "",
        "| predictor | test accuracy |",
        "|---|---|",
        f"| {headline} | **{model['accuracy']:.4f}** |",
    ]
    if zs:
        lines += [
            f"| plurality vote of the annotators (zero-shot) | {zs['plurality_vote_accuracy']:.4f} |",
            f"| first annotator `{zs['first_annotator']}` (zero-shot) | {zs['first_annotator_accuracy']:.4f} |",
            f"| mean single annotator (zero-shot) | {zs['mean_annotator_accuracy']:.4f} |",
            f"| best single annotator (zero-shot) | {zs['best_annotator_accuracy']:.4f} |",
        ]
    cq = metrics.get("candidates") or {}
    if cq.get("coverage") is not None:
        lines += ["", f"Candidate sets on the test split: coverage (true label in set) {cq['coverage']:.4f}, "
                  f"mean set size {cq['mean_set_size']:.2f}."]
    lines += ["", "## Per-class accuracy", "", "| class | accuracy |", "|---|---|"]
    for name in class_names:
        acc = model["per_class_accuracy"][name]
        lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.4f}'} |")
    figures = metrics.get("figures") or []
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 0.8 + 0.5 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    loss_keys = sorted({k for h in history for k, v in h.items() if k.startswith(("loss", "l_")) and
                        isinstance(v, int | float)})
    for key in loss_keys:
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=6)
    clean_keys = sorted({k for h in history for k in h if k.startswith("clean")})
    for key in clean_keys:
        axes[1].plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    axes[1].set_title("clean-split size")
    if clean_keys:
        axes[1].legend(fontsize=6)
    axes[2].plot(epochs, [h.get("val_hit_rate", np.nan) for h in history])
    axes[2].set_title("held-out candidate hit rate")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_evaluate(
    config: RunConfig, train_dir: Path, out_dir: Path, annotations_dir: Path | None = None
) -> Path:
    """Predict the test split with the trained model and write metrics, report and plots.

    A zero-shot train folder (see :func:`coreg.baselines.zero_shot.is_zero_shot_folder`) is evaluated
    on its plurality-vote predictions instead; the outputs have the same contract.
    """
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    class_names = contracts.read_classes(train_dir)
    samples = contracts.read_samples(train_dir)
    test = samples[samples["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise CoregError(f"{train_dir / contracts.SAMPLES_FILE}: the test split is empty")

    candidates_dir = read_input(train_dir, "candidates")
    zero_shot = is_zero_shot_folder(train_dir)
    if zero_shot:
        vote_annotations = _zero_shot_annotations(train_dir, candidates_dir, annotations_dir)
        pred, confidence = zero_shot_test_predictions(train_dir, test, len(class_names), vote_annotations)
        selected_epoch = None
    elif not (train_dir / MODEL_FILE).is_file():
        raise CoregError(f"{train_dir}: no {MODEL_FILE} and no {ZERO_SHOT_FILE}; not a finished coreg train folder")
    else:
        pred, confidence, selected_epoch = _network_predictions(config, train_dir, test)

    y_true = test["label"].to_numpy()
    known = y_true >= 0
    metrics: dict[str, Any] = {
        "model": classification_metrics(y_true[known], pred[known], class_names),
        "selected_epoch": selected_epoch,
    }
    annotations_dir = annotations_dir or (read_input(candidates_dir, "annotations") if candidates_dir else None)
    if zero_shot and annotations_dir is None:
        annotations_dir = vote_annotations
    if known.any() and annotations_dir is not None:
        annotations = contracts.read_annotations(annotations_dir, len(class_names))
        metrics["zero_shot"] = annotator_accuracy(
            annotations, test["sample_id"][known].reset_index(drop=True), y_true[known], len(class_names)
        )
    if known.any() and candidates_dir is not None:
        candidates = contracts.read_candidates(candidates_dir, len(class_names))
        metrics["candidates"] = candidate_quality(
            candidates, test["sample_id"][known].reset_index(drop=True), y_true[known]
        )

    history = [] if zero_shot else _read_history(train_dir)
    with staged_directory(out_dir) as stage:
        save_config(config, stage)
        write_lineage(stage, "evaluate", {"model": train_dir, **({"annotations": annotations_dir}
                                                                  if annotations_dir else {})})
        predictions = pd.DataFrame({
            "sample_id": test["sample_id"],
            "prediction": pred.astype(np.int64),
            "class_name": np.asarray(class_names, dtype=object)[pred],
            "confidence": confidence.astype(np.float32),
        })
        with atomic_path(stage / PREDICTIONS_FILE) as tmp:
            predictions.to_parquet(tmp, index=False)
        figures = []
        if config.evaluate.plots and known.any():
            plot_confusion_matrix(np.asarray(metrics["model"]["confusion_matrix"]), class_names,
                                  stage / "confusion_matrix.png")
            figures.append("confusion_matrix.png")
        if config.evaluate.plots and history:
            plot_training_curves(history, stage / "training_curves.png")
            figures.append("training_curves.png")
        metrics["figures"] = figures
        write_json(stage / METRICS_FILE, metrics)
        write_text(stage / REPORT_FILE, render_report(metrics, class_names, zero_shot=zero_shot))
    log.info("test accuracy %s%s; report at %s", metrics["model"]["accuracy"],
             " (zero-shot plurality vote)" if zero_shot else "", out_dir / REPORT_FILE)
    return out_dir


def _network_predictions(config: RunConfig, train_dir: Path, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Predicted class, softmax confidence and selected epoch of the trained network on ``test``."""
    dataset = load_dataset(config.data)
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    missing = [sid for sid in test["sample_id"] if sid not in position]
    if missing:
        raise CoregError(f"{train_dir / contracts.SAMPLES_FILE}: sample {missing[0]!r} is not in the configured "
                         f"data set ({config.data.source}); the model was trained on other data")
    indices = np.array([position[sid] for sid in test["sample_id"]])

    device = resolve_device(config.train.device)
    model = load_trained(train_dir / MODEL_FILE, device)
    images = dataset.load_images(indices, model.arch["image_size"], model.arch["in_channels"])
    logits = predict_logits(model, images, config.evaluate.batch_size, device)
    probs = _softmax(logits)
    return probs.argmax(1), probs.max(1), model.selected_epoch


def _zero_shot_annotations(train_dir: Path, candidates_dir: Path | None, given: Path | None) -> Path:
    """The annotations the zero-shot votes were made from: the train folder's lineage, else the one given.

    The lineage path comes first (the votes were counted from it); an explicitly given folder is
    used when that path does not exist here (a pipeline step in another pod).
    """
    for folder in (read_input(train_dir, "annotations"),
                   read_input(candidates_dir, "annotations") if candidates_dir else None, given):
        if folder is not None and (folder / contracts.ANNOTATIONS_FILE).is_file():
            return folder
    raise CoregError(f"{train_dir}: zero-shot folder whose annotations are not found (lineage.json names none "
                     "that exists here); pass the annotate folder with --annotations")


def zero_shot_test_predictions(train_dir: Path, test: pd.DataFrame, num_classes: int,
                               annotations_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The plurality votes of ``test`` from ``zero_shot_predictions.parquet`` and their confidence.

    Confidence is the share of the sample's annotators whose top-1 is the predicted class.
    """
    from coreg.aggregate import sample_positions, vote_matrix

    path = train_dir / ZERO_SHOT_FILE
    try:
        votes_file = pd.read_parquet(path, columns=["sample_id", "prediction"])
    except Exception as err:  # pyarrow raises several types for unreadable or incomplete files
        raise CoregError(f"{path}: not a readable zero-shot prediction file ({type(err).__name__})") from None
    pred = votes_file.drop_duplicates("sample_id").set_index("sample_id")["prediction"].reindex(test["sample_id"])
    if pred.isna().any():
        raise CoregError(f"{path}: test sample {pred.index[pred.isna().to_numpy()][0]!r} has no prediction")
    pred = pred.to_numpy().astype(np.int64)
    if ((pred < 0) | (pred >= num_classes)).any():
        raise CoregError(f"{path}: prediction {int(pred[(pred < 0) | (pred >= num_classes)][0])} is not a class "
                         f"index in [0, {num_classes})")
    annotations = contracts.read_annotations(annotations_dir, num_classes)
    ids = list(test["sample_id"])
    rows = annotations[annotations["sample_id"].isin(set(ids))]
    source = str(annotations_dir / contracts.ANNOTATIONS_FILE)
    votes = vote_matrix(sample_positions(rows, ids, source), rows["label"].to_numpy(), len(ids), num_classes)
    answered = votes.sum(axis=1)
    if (answered == 0).any():
        raise CoregError(f"{source}: sample {ids[int(np.flatnonzero(answered == 0)[0])]!r} has no annotation")
    confidence = votes[np.arange(len(ids)), pred] / answered
    return pred, confidence.astype(np.float32)


def _read_history(train_dir: Path) -> list[dict[str, Any]]:
    import json

    path = train_dir / "history.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
