"""DivideMix-style co-training on the annotators' plurality top-1.

DivideMix (Li et al. 2020) is Co-Reg's ancestor: two nets, a warm-up with CE plus a confidence
penalty, then per epoch a 2-component GMM on each net's per-sample loss, and each net trained with
MixMatch on its peer's clean/noisy split (label refinement ``sharpen(w * y + (1 - w) * pbar)`` for
clean rows, co-guessing for the rest). With one-hot "candidate sets" (the plurality top-1) Co-Reg's
trainer computes exactly these quantities: the partial CE is CE, the max-candidate loss is the CE
loss, the peer's prediction restricted to a one-hot set is the label itself. So the baseline is
:func:`coreg.train.fit` on one-hot targets with the prototype and contrastive regularisers never
switched on, and it inherits the trainer's checkpoints, resume, seeding and ``model.pt``.

Differences from the paper's DivideMix, kept so that only the label source differs from Co-Reg:
Co-Reg's distribution alignment and loss averaging (``loss_history``) before the GMM, no uniform-prior
penalty, Co-Reg's views and schedule. Model selection still scores the held-out *candidate sets*.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coreg.config import TrainConfig
from coreg.train.trainer import FitResult, fit


def dividemix_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with L_proto/L_con never active, and the same first selectable epoch as ``cfg``."""
    return cfg.model_copy(update={"reg_start_offset": cfg.epochs, "reg_weight": 0.0,
                                  "selection_start_epoch": cfg.first_selectable_epoch()})


def fit_dividemix(images: np.ndarray, majority: np.ndarray, cfg: TrainConfig, out_dir: Path, *,
                  horizontal_flip: bool, val_images: np.ndarray | None = None,
                  val_candidates: np.ndarray | None = None, progress: bool = False, resume: bool = False,
                  trusted: np.ndarray | None = None) -> FitResult:
    """Co-train two nets on one-hot plurality labels ``majority`` (n, K); see the module docstring."""
    return fit(images, majority, dividemix_config(cfg), out_dir, horizontal_flip=horizontal_flip, resume=resume,
               val_images=val_images, val_candidates=val_candidates, progress=progress, trusted=trusted)
