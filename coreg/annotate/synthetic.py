"""The synthetic noisy-partial-label protocol used to compare with other NPLL papers.

From the true labels: every wrong label enters the candidate set S with probability ``q``;
then, with probability ``eta``, the true label is swapped for a uniformly drawn label that
is not yet in S (so S keeps its size but no longer holds the truth).

Edge case: if S already holds all K labels there is no non-candidate to swap in; the swap
is then skipped (S keeps the true label) and counted as ``swap_skipped``. With K = 10 and
q = 0.3 that happens for about 2 samples in 100,000.

On disk (annotations contract) the set is written as one row per candidate label from a
per-class pseudo-annotator ``synthetic-<class index>``, whose top-1 answer is that class and
which gives no probabilities. The ``union`` rule of the aggregate stage then rebuilds
exactly S, and the (sample_id, annotator) pair stays unique.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SYNTHETIC_PREFIX = "synthetic"


@dataclass
class SyntheticCandidates:
    """The n x K boolean candidate matrix and which samples had their true label swapped out."""

    matrix: np.ndarray
    swapped: np.ndarray
    swap_skipped: int


def synthetic_candidates(
    true_labels: np.ndarray, num_classes: int, q: float, eta: float, seed: int
) -> SyntheticCandidates:
    """Draw candidate sets with the (q, eta) protocol, vectorised, from ``default_rng(seed)``."""
    y_true = np.asarray(true_labels, dtype=np.int64)
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"true labels must be in [0, {num_classes})")
    n = len(y_true)
    rows = np.arange(n)
    rng = np.random.default_rng(seed)
    matrix = rng.random((n, num_classes)) < q
    matrix[rows, y_true] = True
    want_swap = rng.random(n) < eta
    # A uniform draw among non-candidates: random scores, candidates masked out, argmax.
    scores = np.where(matrix, -1.0, rng.random((n, num_classes)))
    has_free = ~matrix.all(axis=1)
    swapped = want_swap & has_free
    new_label = scores.argmax(axis=1)
    matrix[rows[swapped], y_true[swapped]] = False
    matrix[rows[swapped], new_label[swapped]] = True
    return SyntheticCandidates(matrix, swapped, int((want_swap & ~has_free).sum()))


def synthetic_annotator_names(num_classes: int) -> list[str]:
    """``synthetic-00`` ... one pseudo-annotator per class label."""
    width = max(2, len(str(num_classes - 1)))
    return [f"{SYNTHETIC_PREFIX}-{c:0{width}d}" for c in range(num_classes)]


def synthetic_frame(sample_ids: list[str], matrix: np.ndarray) -> pd.DataFrame:
    """The annotations contract rows: one per (sample, candidate label), no probabilities."""
    rows, labels = np.nonzero(matrix)
    names = np.asarray(synthetic_annotator_names(matrix.shape[1]), dtype=object)
    return pd.DataFrame(
        {
            "sample_id": np.asarray(sample_ids, dtype=object)[rows],
            "annotator": names[labels],
            "label": labels.astype(np.int32),
            "probability": np.full(len(rows), np.nan, dtype=np.float32),
            "probs": [None] * len(rows),
        }
    )
