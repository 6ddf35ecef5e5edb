"""Train stage: candidate sets on disk -> a trained Co-Reg model on disk.

This is the glue between the data contracts and :func:`coreg.train.trainer.fit`: it
checks that the candidate sets belong to the configured data set, holds out a seeded
validation part of the training split (its candidate sets, never its labels, drive model
selection), loads the images and runs the trainer. The output folder is kept between
calls so ``resume=True`` can continue from the last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from coreg import contracts
from coreg.atomic import atomic_path, write_json
from coreg.baselines import fit_dividemix, fit_proden, fit_soft_targets, majority_targets, soft_targets
from coreg.baselines.zero_shot import run_zero_shot
from coreg.config import RunConfig, save_config
from coreg.data import load_dataset
from coreg.errors import CoregError
from coreg.lineage import write_lineage
from coreg.train.distributed import env_world_size, is_main_process
from coreg.train.trainer import FitResult, fit

log = logging.getLogger(__name__)

ROLES_FILE = "train_roles.parquet"
SUMMARY_FILE = "train_summary.json"


def validation_roles(n: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded 'fit'/'val' roles for the n training samples (at least one of each when n allows)."""
    roles = np.full(n, "fit", dtype=object)
    n_val = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
        roles[np.random.default_rng(seed).permutation(n)[:n_val]] = "val"
    return roles


def run_train(config: RunConfig, candidates_dir: Path, out_dir: Path, *, resume: bool = False,
              progress: bool = True, stop_after_epoch: int | None = None) -> Path:
    """Train ``train.method`` (Co-Reg or a baseline) on the train split of ``candidates_dir`` into ``out_dir``."""
    candidates_dir, out_dir = Path(candidates_dir), Path(out_dir)
    if env_world_size() > 1 and config.train.method != "coreg":
        raise CoregError(f"train.method={config.train.method}: distributed training (torchrun, WORLD_SIZE > 1) is "
                         "implemented for train.method=coreg only; start it without torchrun")
    if config.train.method == "zero_shot":  # no network: the plurality vote is the prediction
        return run_zero_shot(config, candidates_dir, out_dir)
    class_names = contracts.read_classes(candidates_dir)
    samples = contracts.read_samples(candidates_dir)
    candidates = contracts.read_candidates(candidates_dir, len(class_names))

    train_ids = samples.loc[samples["split"] == "train", "sample_id"].reset_index(drop=True)
    sets = candidates.set_index("sample_id")["candidates"].reindex(train_ids.to_numpy())
    if sets.isna().any():
        missing = train_ids[sets.isna().to_numpy()].iloc[0]
        raise CoregError(f"{candidates_dir / contracts.CANDIDATES_FILE}: training sample {missing!r} has no "
                         "candidate set")
    dataset = load_dataset(config.data)
    if list(dataset.class_names) != class_names:
        raise CoregError(f"{candidates_dir / contracts.CLASSES_FILE}: class names differ from the configured "
                         f"data set ({config.data.source}); the annotations come from a different data set")
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    unknown = [sid for sid in train_ids if sid not in position]
    if unknown:
        raise CoregError(f"{candidates_dir / contracts.SAMPLES_FILE}: sample {unknown[0]!r} is not in the "
                         f"configured data set ({config.data.source}); the annotations come from a different "
                         "data set")

    cfg = config.train
    roles = validation_roles(len(train_ids), cfg.validation_fraction, cfg.seed)
    y = contracts.candidate_matrix(list(sets), len(class_names))
    indices = np.array([position[sid] for sid in train_ids])
    channels = config.data.resolved_channels()
    images = dataset.load_images(indices, config.data.image_size, channels)
    fit_mask, val_mask = roles == "fit", roles == "val"
    few_shot = candidates.set_index("sample_id")["few_shot"].reindex(train_ids.to_numpy()).fillna(False)
    trusted = few_shot.to_numpy(dtype=bool)[fit_mask]

    main = is_main_process()  # under torchrun only rank 0 writes the stage folder
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(config, out_dir)
        write_lineage(out_dir, "train", {"candidates": candidates_dir})
        contracts.write_classes(out_dir, class_names)
        contracts.write_samples(out_dir, samples)
        with atomic_path(out_dir / ROLES_FILE) as tmp:
            pd.DataFrame({"sample_id": train_ids, "role": roles.astype(str)}).to_parquet(tmp, index=False)

    flip = cfg.horizontal_flip if cfg.horizontal_flip is not None else config.data.source != "digits"
    log.info("training on %d samples (%d held out for model selection, %d few-shot labels), %d classes",
             int(fit_mask.sum()), int(val_mask.sum()), int(trusted.sum()), len(class_names))
    val = {"val_images": images[val_mask] if val_mask.any() else None,
           "val_candidates": y[val_mask] if val_mask.any() else None}
    if cfg.method == "coreg":
        result = fit(
            images[fit_mask], y[fit_mask], cfg, out_dir,
            horizontal_flip=flip, resume=resume, **val,
            progress=progress, stop_after_epoch=stop_after_epoch, trusted=trusted if trusted.any() else None,
        )
    else:
        result = _fit_baseline(config, candidates_dir, candidates, list(train_ids[fit_mask]), images[fit_mask],
                               y[fit_mask], trusted, out_dir, flip, resume, progress, val)
    if not main:
        return out_dir
    write_json(out_dir / SUMMARY_FILE, {
        "method": cfg.method,
        "fit_samples": int(fit_mask.sum()), "validation_samples": int(val_mask.sum()),
        "few_shot_samples": int(trusted.sum()), "epochs_done": len(result.history),
        "selected_epoch": result.best_epoch, "selection_metric": "val_candidate_hit_rate",
        "selected_val_hit_rate": result.best_val_hit_rate,
    })
    return out_dir


def _fit_baseline(config: RunConfig, candidates_dir: Path, candidates: pd.DataFrame, fit_ids: list[str],
                  images: np.ndarray, y: np.ndarray, trusted: np.ndarray, out_dir: Path, flip: bool, resume: bool,
                  progress: bool, val: dict[str, np.ndarray | None]) -> FitResult:
    """Train a baseline of ``train.method`` on the fit part (held-out part and selection as for Co-Reg)."""
    cfg = config.train
    k = y.shape[1]
    if resume and cfg.method != "dividemix":
        log.warning("train.method=%s keeps no checkpoints: --resume starts afresh", cfg.method)
    if cfg.method == "proden":
        return fit_proden(images, y, cfg, out_dir, horizontal_flip=flip, progress=progress, **val)
    if cfg.method == "soft_distill":
        targets = soft_targets(candidates, fit_ids, k, str(candidates_dir / contracts.CANDIDATES_FILE))
    else:
        targets = majority_targets(candidates_dir, fit_ids, k)
    if trusted.any():  # a few-shot human label beats any vote: its candidate set is that one label
        targets[trusted] = y[trusted] / y[trusted].sum(axis=1, keepdims=True)
    if cfg.method == "dividemix":
        return fit_dividemix(images, targets, cfg, out_dir, horizontal_flip=flip, resume=resume, progress=progress,
                             trusted=trusted if trusted.any() else None, **val)
    return fit_soft_targets(images, targets, y, cfg, out_dir, horizontal_flip=flip, progress=progress, **val)
