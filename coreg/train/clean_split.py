"""Clean/noisy split of the training set from the max-candidate loss (Co-Reg step 2-3).

Losses are min-max normalised per epoch (so epochs are comparable while the network
changes), averaged over the last few epochs (so one noisy epoch does not flip the split),
and a 2-component Gaussian mixture separates the low-loss (clean) mode from the rest.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

_FLAT = 1e-8


def minmax_normalise(losses: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector becomes all zeros (every sample equally clean)."""
    lo, hi = losses.min(), losses.max()
    if float(hi - lo) < _FLAT:
        return torch.zeros_like(losses)
    return (losses - lo) / (hi - lo)


class LossHistory:
    """The last ``length`` epochs of normalised per-sample losses, one row per epoch."""

    def __init__(self, length: int, n: int) -> None:
        self.length = length
        self.rows = torch.zeros(0, n)

    def update(self, losses: torch.Tensor) -> torch.Tensor:
        """Append this epoch's (raw) losses; return the average of the stored normalised rows."""
        row = minmax_normalise(losses.detach().float().cpu()).unsqueeze(0)
        self.rows = torch.cat([self.rows, row], dim=0)[-self.length:]
        return self.rows.mean(dim=0)

    def state(self) -> torch.Tensor:
        return self.rows.clone()

    def load(self, rows: torch.Tensor) -> None:
        self.rows = rows.detach().float().cpu().clone()


def gmm_clean_weights(losses: np.ndarray, threshold: float, seed: int,
                      reg_covar: float = 5e-4, max_iter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Return (w, clean): w_i = posterior of the low-mean component, clean = w > threshold.

    Degenerate inputs (fewer than 2 samples, or all losses equal) give w = 1 for every sample:
    with nothing to separate, the candidate sets are all the information there is.
    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    n = losses.shape[0]
    if n < 2 or np.ptp(losses) < _FLAT:
        w = np.ones(n)
        return w, w > threshold
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=1e-2, reg_covar=reg_covar, random_state=seed)
    x = losses.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x)
    posterior = gmm.predict_proba(x)
    w = posterior[:, int(np.argmin(gmm.means_.reshape(-1)))]
    return w, w > threshold
