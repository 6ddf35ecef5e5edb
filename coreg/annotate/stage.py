"""Annotate stage: data set -> samples, per-annotator answers and a summary, written atomically.

The summary (``annotation_summary.json``) reports, where ground truth is known, the figures
the reference prints: zero-shot accuracy of annotator 0 (template 0), accuracy of the
plurality vote, the noise rate (share of samples whose true label is outside S, with S the
union of the annotators' top-1 answers) and the mean |S|, on all samples and per split.
For the synthetic protocol S is the drawn set, and the zero-shot and vote accuracies are
null because its per-class pseudo-annotators are not real annotators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coreg.aggregate import plurality_vote
from coreg.annotate.simulate import simulate_vlm_annotations, simulation_frame
from coreg.annotate.synthetic import synthetic_candidates, synthetic_frame
from coreg.atomic import staged_directory, write_json
from coreg.config import RunConfig, save_config
from coreg.contracts import SPLITS, write_annotations, write_classes, write_samples
from coreg.data.dataset import ImageDataset
from coreg.data.sources import load_dataset
from coreg.data.splits import split_samples
from coreg.errors import CoregError
from coreg.lineage import write_lineage

SUMMARY_FILE = "annotation_summary.json"


def _rate(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def set_figures(
    sets: np.ndarray, labels: np.ndarray, zero_shot: np.ndarray | None, vote: np.ndarray | None
) -> dict[str, Any]:
    """Mean |S|, noise rate and accuracies for one group of samples (labels -1 are skipped)."""
    known = labels >= 0
    y = labels[known]
    coverage = sets[known][np.arange(len(y)), y]
    return {
        "n_samples": len(labels),
        "labelled_samples": int(known.sum()),
        "mean_set_size": _rate(sets.sum(axis=1)),
        "noise_rate": None if not len(y) else 1.0 - float(coverage.mean()),
        "zero_shot_accuracy": None if zero_shot is None else _rate(zero_shot[known] == y),
        "majority_vote_accuracy": None if vote is None else _rate(vote[known] == y),
    }


def annotation_summary(
    sets: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    zero_shot: np.ndarray | None,
    vote: np.ndarray | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Figures on all samples and on each split, plus method-specific details."""

    def pick(a: np.ndarray | None, m: np.ndarray) -> np.ndarray | None:
        return None if a is None else a[m]

    summary = set_figures(sets, labels, zero_shot, vote)
    summary["by_split"] = {
        name: set_figures(
            sets[split == name], labels[split == name], pick(zero_shot, split == name), pick(vote, split == name)
        )
        for name in SPLITS
    }
    summary.update(extra)
    return summary


def _simulate(config: RunConfig, dataset: ImageDataset, split: np.ndarray) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg = config.annotate
    sim = simulate_vlm_annotations(dataset, split, cfg)
    n, k = len(dataset), dataset.num_classes
    votes = np.zeros((n, k), dtype=np.int64)
    for answers in sim.labels:
        votes[np.arange(n), answers] += 1
    teacher = sim.teacher_logits.argmax(axis=1)
    test = (split == "test") & (dataset.labels >= 0)
    extra = {
        "method": "simulate_vlm",
        "num_annotators": cfg.num_annotators,
        "teacher": {
            "fit_samples": len(sim.teacher_indices),
            "test_accuracy": _rate(teacher[test] == dataset.labels[test]),
        },
    }
    summary = annotation_summary(votes > 0, dataset.labels, split, sim.labels[0], plurality_vote(votes), extra)
    return simulation_frame(dataset.sample_ids, sim), summary


def _synthetic(config: RunConfig, dataset: ImageDataset, split: np.ndarray) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg = config.annotate
    if (dataset.labels < 0).any():
        raise CoregError(
            f"{dataset.source}: annotate.method 'synthetic' needs the true label of every sample; "
            f"{int((dataset.labels < 0).sum())} have none"
        )
    drawn = synthetic_candidates(dataset.labels, dataset.num_classes, cfg.q, cfg.eta, cfg.seed)
    extra = {
        "method": "synthetic",
        "num_annotators": dataset.num_classes,
        "synthetic": {
            "q": cfg.q,
            "eta": cfg.eta,
            "swapped": int(drawn.swapped.sum()),
            "swap_skipped": drawn.swap_skipped,
        },
    }
    summary = annotation_summary(drawn.matrix, dataset.labels, split, None, None, extra)
    return synthetic_frame(dataset.sample_ids, drawn.matrix), summary


def run_annotate(config: RunConfig, out_dir: Path) -> Path:
    """Load and split the data, annotate it, and write the annotate folder (all files or none)."""
    dataset = load_dataset(config.data)
    split = split_samples(dataset.sample_ids, config.data.test_fraction, config.data.split_seed)
    method = _simulate if config.annotate.method == "simulate_vlm" else _synthetic
    annotations, summary = method(config, dataset, split)
    samples = pd.DataFrame({"sample_id": dataset.sample_ids, "split": split, "label": dataset.labels})
    summary = {"source": config.data.source, **summary}
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        save_config(config, staging)
        write_lineage(staging, "annotate", {"data": Path(config.data.path)} if config.data.path else {})
        write_classes(staging, dataset.class_names)
        write_samples(staging, samples)
        write_annotations(staging, annotations)
        write_json(staging / SUMMARY_FILE, summary)
    return out_dir
