"""One-network baselines: cross-entropy on fixed soft/hard targets, and PRODEN on candidate sets.

All of them are one training loop with a per-row target matrix T (n, K):

* ``ce_majority``: T = one-hot plurality top-1 (hard distillation of the annotators);
* ``soft_distill``: T = mean annotator probabilities (soft distillation);
* ``proden``: T starts uniform over the candidate set S and, after every step, the batch's rows are
  replaced by the network's own prediction restricted to S and renormalised (PRODEN, Lv et al. 2020).

They reuse Co-Reg's building blocks so a comparison differs only in the method: the backbone, the strong
view of the warm-up (crop/flip + one RandAugment op + Cutout), SGD with the cosine schedule, per-epoch
seeds, the held-out candidate hit-rate model selection from ``cfg.first_selectable_epoch()`` and the
``model.pt`` format. The one trained network is written as both ``net1`` and ``net2`` of a
:class:`CoRegEnsemble`: its logits are doubled, the argmax is unchanged, and ``load_trained`` /
``predict_logits`` / ``coreg evaluate`` need no baseline-specific path. Not provided: checkpoints and
``--resume`` (a baseline run is short; ``resume=True`` starts afresh).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coreg.atomic import write_json
from coreg.config import TrainConfig
from coreg.errors import CoregError
from coreg.train import losses as L
from coreg.train import trainer as T
from coreg.train.augment import Augmenter, MultiViewDataset, channel_stats, derive_seed, make_loader
from coreg.train.network import CoRegEnsemble

log = logging.getLogger(__name__)

_STREAM = 11  # random stream of the baselines' epochs (Co-Reg uses 1-4)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits)_ij (plain CE when t is one-hot)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def fit_soft_targets(images: np.ndarray, targets: np.ndarray, candidates: np.ndarray, cfg: TrainConfig,
                     out_dir: Path, *, horizontal_flip: bool, val_images: np.ndarray | None = None,
                     val_candidates: np.ndarray | None = None, progress: bool = False) -> T.FitResult:
    """Train one net on fixed per-row target distributions ``targets`` (n, K) (ce_majority, soft_distill).

    ``candidates`` is only checked for shape; it keeps the signature of :func:`fit_proden`.
    """
    return _fit_single(images, targets, candidates, cfg, out_dir, horizontal_flip=horizontal_flip, proden=False,
                       val_images=val_images, val_candidates=val_candidates, progress=progress)


def fit_proden(images: np.ndarray, candidates: np.ndarray, cfg: TrainConfig, out_dir: Path, *,
               horizontal_flip: bool, val_images: np.ndarray | None = None,
               val_candidates: np.ndarray | None = None, progress: bool = False) -> T.FitResult:
    """Train one net with PRODEN on 0/1 candidate sets (n, K); targets start uniform over each set."""
    mask = (np.asarray(candidates, dtype=np.float32) > 0).astype(np.float32)
    mask[mask.sum(axis=1) == 0] = 1.0  # no candidate = any class, as in Co-Reg
    start = mask / mask.sum(axis=1, keepdims=True)
    return _fit_single(images, start, mask, cfg, out_dir, horizontal_flip=horizontal_flip, proden=True,
                       val_images=val_images, val_candidates=val_candidates, progress=progress)


def _fit_single(images: np.ndarray, targets: np.ndarray, candidates: np.ndarray, cfg: TrainConfig, out_dir: Path,
                *, horizontal_flip: bool, proden: bool, val_images: np.ndarray | None,
                val_candidates: np.ndarray | None, progress: bool) -> T.FitResult:
    out_dir = Path(out_dir)
    images_t, cand_t = T._check_inputs(images, candidates, "training")
    targets_t = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if targets_t.shape != cand_t.shape:
        raise CoregError(f"training targets must be {tuple(cand_t.shape)}, got {tuple(targets_t.shape)}")
    val_t = T._check_validation(val_images, val_candidates, images_t, cand_t)
    device = T.resolve_device(cfg.device)
    history: list[dict[str, Any]] = []
    best_metric: float | None = None
    best_epoch: int | None = None
    model_path = out_dir / "model.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path.unlink(missing_ok=True)  # a fresh run never keeps an older run's model
    with T._deterministic(device):
        T._seed_everything(cfg.seed)
        mean, std = channel_stats(images_t)
        arch = T._arch(cfg, images_t, cand_t.shape[1])
        model = CoRegEnsemble(arch, with_momentum=False)
        model.mean.copy_(mean)
        model.std.copy_(std)
        model.to(device)
        arch["feature_dim"] = model.net1.feature_dim
        model.arch["feature_dim"] = model.net1.feature_dim
        net = model.net1
        optimizer = torch.optim.SGD(net.query_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        augmenter = Augmenter(mean, std, arch["image_size"], horizontal_flip, cfg.randaugment_magnitude)
        data = T._Data(images_t, cand_t.to(device), augmenter, val_t[0] if val_t else None,
                       val_t[1].to(device) if val_t else None)
        targets_t = targets_t.to(device)
        n = images_t.shape[0]
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            lr = T.cosine_lr(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed = derive_seed(cfg.seed, _STREAM, epoch)
            order = torch.randperm(n, generator=T._generator(derive_seed(seed, 0))).tolist()
            dataset = MultiViewDataset(images_t, augmenter, "strong", derive_seed(seed, 1))
            loader = make_loader(dataset, order, cfg.batch_size, cfg.num_workers, derive_seed(seed, 2),
                                 pin_memory=device.type == "cuda")
            net.train()
            total, steps = 0.0, 0
            for views, idx in loader:
                idx = idx.to(device)
                logits = net(views.to(device, non_blocking=True))
                loss = soft_cross_entropy(logits, targets_t[idx])
                T._step(optimizer, loss)
                if proden:  # progressive identification: the new target is the prediction restricted to S
                    with torch.no_grad():
                        targets_t[idx] = L.restrict_to_candidates(F.softmax(logits.detach(), dim=1),
                                                                  data.candidates[idx])
                total += float(loss.detach())
                steps += 1
            model.net2.load_state_dict(net.state_dict())  # one net, stored twice: argmax(2 * logits) = argmax
            hit = T._hit_rate(model, data, cfg.eval_batch_size) if data.val_images is not None else None
            history.append({"epoch": epoch + 1, "phase": "baseline", "lr": lr, "loss": total / max(steps, 1),
                            "l_x": total / max(steps, 1), "val_hit_rate": hit,
                            "seconds": round(time.perf_counter() - start, 3)})
            selectable = epoch + 1 >= cfg.first_selectable_epoch()
            if hit is not None and selectable and (best_metric is None or hit >= best_metric):
                best_metric, best_epoch = hit, epoch + 1
                T.save_model(model_path, model, epoch + 1, hit)
            if progress:
                log.info("epoch %d/%d loss %.4f val_hit_rate %s", epoch + 1, cfg.epochs, history[-1]["loss"],
                         "-" if hit is None else f"{hit:.4f}")
        if not model_path.exists():
            T.save_model(model_path, model, cfg.epochs, None)
            best_epoch = cfg.epochs
        write_json(out_dir / "history.json", history)
    return T.FitResult(model_path, history, best_epoch, best_metric)
