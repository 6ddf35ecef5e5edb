"""Training targets of the distillation baselines, built from the stage folders on disk.

The hard target is the annotators' plurality top-1 (``coreg.aggregate.plurality_vote``, ties to the
lower class index), read from the annotations the candidate sets were made from (followed through
``lineage.json``): the candidate set alone does not say which of its labels most annotators named.
The soft target is the candidates' ``mean_probs`` column (the mean of the annotators' probability
vectors), which only exists when the annotators gave probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from coreg import contracts
from coreg.aggregate import plurality_vote, sample_positions, vote_matrix
from coreg.errors import CoregError
from coreg.lineage import read_input


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(n,) int labels -> (n, K) float32 one-hot rows."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return out


def majority_labels(annotations: pd.DataFrame, sample_ids: Sequence[str], num_classes: int,
                    source: str = "annotations") -> np.ndarray:
    """Plurality top-1 of the annotators for each of ``sample_ids`` (annotation rows of other samples are ignored)."""
    rows = annotations[annotations["sample_id"].isin(set(sample_ids))]
    positions = sample_positions(rows, sample_ids, source)
    votes = vote_matrix(positions, rows["label"].to_numpy(), len(sample_ids), num_classes)
    if (votes.sum(axis=1) == 0).any():
        missing = list(sample_ids)[int(np.flatnonzero(votes.sum(axis=1) == 0)[0])]
        raise CoregError(f"{source}: sample {missing!r} has no annotation, so it has no majority label")
    return plurality_vote(votes)


def majority_targets(candidates_dir: Path, sample_ids: Sequence[str], num_classes: int) -> np.ndarray:
    """One-hot plurality top-1 (n, K) of the annotations behind ``candidates_dir``."""
    annotations_dir = read_input(Path(candidates_dir), "annotations")
    if annotations_dir is None:
        raise CoregError(f"{candidates_dir}: lineage.json names no annotations folder; the majority-vote baselines "
                         "need the annotators' answers")
    annotations = contracts.read_annotations(annotations_dir, num_classes)
    labels = majority_labels(annotations, sample_ids, num_classes, str(annotations_dir / contracts.ANNOTATIONS_FILE))
    return one_hot(labels, num_classes)


def soft_targets(candidates: pd.DataFrame, sample_ids: Sequence[str], num_classes: int, source: str) -> np.ndarray:
    """Mean annotator probabilities (n, K) from the candidates' ``mean_probs`` column, rows renormalised."""
    probs = candidates.set_index("sample_id")["mean_probs"].reindex(list(sample_ids))
    missing = probs.map(lambda v: not isinstance(v, list | tuple | np.ndarray) or len(v) == 0)
    if missing.any():
        raise CoregError(f"{source}: sample {probs.index[missing.to_numpy()][0]!r} has no mean_probs; soft_distill "
                         "needs annotators that give probabilities (use ce_majority otherwise)")
    out = np.stack([np.asarray(v, dtype=np.float64) for v in probs.to_numpy()])
    if out.shape[1] != num_classes or not np.isfinite(out).all():
        raise CoregError(f"{source}: mean_probs must be finite vectors of length {num_classes}")
    out = np.clip(out, 0.0, None)
    total = out.sum(axis=1, keepdims=True)
    out = np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / num_classes)
    return out.astype(np.float32)
