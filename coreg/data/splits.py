"""Seeded train/test split, reproducible from the sample ids alone.

The reference code draws unseeded splits; here the same ids and seed always give the same
split, whatever order the ids come in, so a rerun or another stage can rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coreg.errors import CoregError


def split_samples(samples: int | Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Return ``'train'`` / ``'test'`` per sample: ``round(n * test_fraction)`` test samples.

    ``samples`` is either the number of samples (positions are the ids) or the ids; ids are
    sorted before the seeded permutation so the assignment of an id does not depend on the
    order it is listed in. With two or more samples both splits get at least one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise CoregError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    if isinstance(samples, int | np.integer):
        n = int(samples)
        canonical = np.arange(n)
    else:
        ids = np.asarray(list(samples), dtype=str)
        n = len(ids)
        if len(set(ids.tolist())) != n:
            raise CoregError("split_samples: sample ids must be unique")
        canonical = np.argsort(ids, kind="stable")
    n_test = round(n * test_fraction)
    n_test = min(max(n_test, 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype="<U5")
    split[canonical[perm[:n_test]]] = "test"
    return split
