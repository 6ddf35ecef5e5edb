"""Co-Reg training loop: warm-up, then co-divide + co-pseudo-labelling + MixMatch + regularisers.

``fit`` follows ``docs/method.md`` step by step. Design choices the method leaves open:

* Randomness. Every random draw of epoch e (sample order, views, MixMatch, GMM) comes from
  a seed derived from ``(cfg.seed, stream, e, net)``. A run resumed at an epoch boundary
  therefore replays exactly what an uninterrupted run does, with or without worker
  processes, and two seeded CPU runs give bit-identical weights.
* The per-epoch prediction pass uses one weak view per sample (seeded) in eval mode; its
  output is reused for alignment, the loss history, the GMM and the peer targets ``q``.
* Clean flags: rows of the labelled (clean) split are clean, unlabelled rows are not.
  Contrastive queries are the training net's embeddings of view w1 (labelled and
  unlabelled rows), keys come from the momentum encoder on view s1.
* Prototypes are updated every Co-Reg step (so they are ready when L_proto starts);
  the key encoder, queue and L_con/L_proto run only once the regularisers are active.
* Empty splits: an empty unlabelled split trains on labelled rows only; an empty
  labelled split (the GMM calls nothing clean) trains that net on co-guessed targets of
  all rows for one pass, without L_x (there is no trusted row to anchor it).
* Model selection: with validation data, the epoch with the highest candidate hit rate
  wins among the epochs from ``cfg.first_selectable_epoch()`` on (once every loss is at
  full weight: warm-up epochs fit the candidate sets, noise included, and so score high
  on the hit rate while generalising worse); ties go to the later epoch. Without
  validation data the last epoch is kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from coreg.atomic import atomic_path, write_json
from coreg.config import TrainConfig
from coreg.errors import CoregError
from coreg.train import distributed
from coreg.train import losses as L
from coreg.train.augment import Augmenter, MultiViewDataset, channel_stats, derive_seed, make_loader
from coreg.train.clean_split import LossHistory, gmm_clean_weights
from coreg.train.network import CoRegEnsemble, CoRegNet

log = logging.getLogger(__name__)

MODEL_FORMAT = "coreg-model"
CHECKPOINT_FORMAT = "coreg-checkpoint"
FORMAT_VERSION = 1
# Config fields that may change between a run and its resume without changing the result.
RESUME_FREE_FIELDS = frozenset({"num_workers", "device", "eval_batch_size"})

_WARMUP, _EVAL, _COREG, _GMM = 1, 2, 3, 4  # random streams


@dataclass
class FitResult:
    """What :func:`fit` produced: the model file, the per-epoch history and the selected epoch."""

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_val_hit_rate: float | None


@dataclass
class _Data:
    images: torch.Tensor  # uint8 (N, C, H, W), CPU
    candidates: torch.Tensor  # float (N, K), on the device
    augmenter: Augmenter
    val_images: torch.Tensor | None
    val_candidates: torch.Tensor | None
    trusted: np.ndarray | None = None  # bool (N,): few-shot human labels, always clean with weight 1


@dataclass
class _State:
    model: CoRegEnsemble
    optimizers: list[torch.optim.SGD]
    loss_histories: list[LossHistory]
    history: list[dict[str, Any]] = field(default_factory=list)
    next_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None


@dataclass
class _Run:
    cfg: TrainConfig
    device: torch.device
    data: _Data
    out_dir: Path
    progress: bool
    dist: distributed.DistContext | None = None  # set under torchrun (WORLD_SIZE > 1)

    @property
    def main(self) -> bool:
        """Whether this process writes files (always, unless it is a rank > 0 of a distributed run)."""
        return self.dist is None or self.dist.main

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


# ----------------------------------------------------------------------------- public API


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CoregError(f"train.device: unknown device {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CoregError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def fit(
    images: np.ndarray,
    candidates: np.ndarray,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    horizontal_flip: bool,
    resume: bool = False,
    val_images: np.ndarray | None = None,
    val_candidates: np.ndarray | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    trusted: np.ndarray | None = None,
) -> FitResult:
    """Train Co-Reg on uint8 images (N, C, H, W) with 0/1 candidate sets (N, K).

    Writes ``out_dir/model.pt``, ``out_dir/history.json`` and, after every epoch,
    ``out_dir/checkpoints/last.pt``. ``resume=True`` continues from that checkpoint (or starts
    afresh when there is none). ``stop_after_epoch=k`` ends after k completed epochs without
    changing the schedule, which is how an interruption is simulated. ``trusted`` (bool, N)
    marks few-shot human labels: both nets take their (single-label) sets as clean with
    weight 1, whatever the GMM says. Rows of ``candidates`` with no candidate are treated as
    "any class" rather than crashing the partial loss.
    """
    out_dir = Path(out_dir)
    images_t, cand_t = _check_inputs(images, candidates, "training")
    val_t = _check_validation(val_images, val_candidates, images_t, cand_t)
    device = resolve_device(cfg.device)
    if distributed.env_world_size() > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())  # torchrun: one GPU per process
        torch.cuda.set_device(device)
    ctx = distributed.init_from_env(device)
    return _fit(images_t, cand_t, val_t, cfg, out_dir, device, ctx, horizontal_flip=horizontal_flip,
                resume=resume, progress=progress, stop_after_epoch=stop_after_epoch, trusted=trusted)


def _fit(images_t: torch.Tensor, cand_t: torch.Tensor, val_t: tuple[torch.Tensor, torch.Tensor] | None,
         cfg: TrainConfig, out_dir: Path, device: torch.device, ctx: distributed.DistContext | None, *,
         horizontal_flip: bool, resume: bool, progress: bool, stop_after_epoch: int | None,
         trusted: np.ndarray | None) -> FitResult:
    main = ctx is None or ctx.main
    with _deterministic(device):
        _seed_everything(cfg.seed)
        mean, std = channel_stats(images_t)
        arch = _arch(cfg, images_t, cand_t.shape[1])
        state = _new_state(cfg, arch, mean, std, device, images_t.shape[0])
        if ctx is not None:  # BatchNorm over the global batch (the rows of all ranks)
            distributed.convert_batchnorm(state.model)
        ckpt = out_dir / "checkpoints" / "last.pt"
        if main:
            # A run killed while writing leaves atomic_path's temporary files behind; they are never read.
            for stray in [*out_dir.glob("checkpoints/.last.pt.*.tmp"), *out_dir.glob(".model.pt.*.tmp")]:
                stray.unlink(missing_ok=True)
            if not (resume and ckpt.exists()):
                (out_dir / "model.pt").unlink(missing_ok=True)  # a fresh run never keeps an older run's model
        if ctx is not None:
            ctx.barrier()
        if resume and ckpt.exists():
            _load_checkpoint(state, ckpt, cfg, images_t.shape[0], cand_t.shape[1], device)
            log.info("resuming from %s at epoch %d", ckpt, state.next_epoch + 1)
        augmenter = Augmenter(mean, std, arch["image_size"], horizontal_flip, cfg.randaugment_magnitude)
        data = _Data(images_t, cand_t.to(device), augmenter,
                     val_t[0] if val_t else None, val_t[1].to(device) if val_t else None,
                     _check_trusted(trusted, images_t.shape[0]))
        run = _Run(cfg, device, data, out_dir, progress and main, ctx)
        last = cfg.epochs if stop_after_epoch is None else max(0, min(cfg.epochs, stop_after_epoch))
        for epoch in range(state.next_epoch, last):
            _run_epoch(run, state, epoch)
        model_path = out_dir / "model.pt"
        if main and (data.val_images is None or not model_path.exists()) and state.next_epoch > 0:
            _save_model(model_path, state, state.next_epoch, None)
        if data.val_images is None:
            state.best_epoch = state.next_epoch or None
        if main:
            write_json(out_dir / "history.json", state.history)
        run.barrier()
    return FitResult(model_path, state.history, state.best_epoch, state.best_metric)


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> CoRegEnsemble:
    """Load ``model.pt`` written by :func:`fit` as an eval-mode :class:`CoRegEnsemble`."""
    path = Path(path)
    if not path.is_file():
        raise CoregError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CoregError(f"{path}: not a coreg model file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CoregError(f"{path}: not a coreg model file (missing format marker {MODEL_FORMAT!r})")
    try:
        model = CoRegEnsemble(payload["arch"], with_momentum=False)
        model.net1.load_state_dict(payload["net1"])
        model.net2.load_state_dict(payload["net2"])
        model.prototypes.copy_(payload["prototypes"])
        model.mean.copy_(payload["mean"])
        model.std.copy_(payload["std"])
        model.selected_epoch = int(payload["epoch"])
    except (KeyError, RuntimeError, TypeError, CoregError) as err:
        raise CoregError(f"{path}: coreg model file is incomplete or inconsistent ({err})") from None
    return model.to(resolve_device(device)).eval()


@torch.no_grad()
def predict_logits(model: CoRegEnsemble, images: np.ndarray, batch_size: int = 1024,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Ensemble logits (N, K) for uint8 images (N, C, H, W); normalisation happens here."""
    images_t = torch.as_tensor(np.ascontiguousarray(images))
    if images_t.dtype != torch.uint8 or images_t.ndim != 4:
        raise CoregError(f"predict: images must be uint8 (N, C, H, W), got {images_t.dtype} {tuple(images_t.shape)}")
    if device is not None:
        model = model.to(resolve_device(device))
    was_training = model.training
    model.eval()
    try:
        out = [model(model.normalize(images_t[i:i + batch_size])).float().cpu()
               for i in range(0, images_t.shape[0], batch_size)]
    finally:
        model.train(was_training)
    k = model.arch["num_classes"]
    return torch.cat(out).numpy() if out else np.zeros((0, k), dtype=np.float32)


# ----------------------------------------------------------------------------- setup


def _check_inputs(images: np.ndarray, candidates: np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.asarray(images)
    candidates = np.asarray(candidates, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise CoregError(f"{what} images must be uint8 (N, C, H, W) with C 1 or 3, got {images.dtype} "
                         f"{images.shape}")
    if images.shape[2] != images.shape[3]:
        raise CoregError(f"{what} images must be square, got {images.shape[2]}x{images.shape[3]}")
    if candidates.ndim != 2 or candidates.shape[0] != images.shape[0] or candidates.shape[1] < 2:
        raise CoregError(f"{what} candidates must be (N, K) with N = {images.shape[0]} and K >= 2, got "
                         f"{candidates.shape}")
    if images.shape[0] == 0:
        raise CoregError(f"{what} set is empty")
    mask = torch.from_numpy((candidates > 0).astype(np.float32))
    empty = mask.sum(dim=1) == 0
    mask[empty] = 1.0  # no candidate = no information: any class is allowed
    return torch.from_numpy(np.ascontiguousarray(images)), mask


def _check_validation(val_images: np.ndarray | None, val_candidates: np.ndarray | None, images: torch.Tensor,
                      candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if val_images is None and val_candidates is None:
        return None
    if val_images is None or val_candidates is None:
        raise CoregError("validation needs both val_images and val_candidates")
    if len(val_images) == 0:
        return None
    v_img, v_cand = _check_inputs(val_images, val_candidates, "validation")
    if v_img.shape[1:] != images.shape[1:] or v_cand.shape[1] != candidates.shape[1]:
        raise CoregError(f"validation data {tuple(v_img.shape)}/{tuple(v_cand.shape)} does not match the "
                         f"training data {tuple(images.shape)}/{tuple(candidates.shape)}")
    return v_img, (torch.from_numpy(np.asarray(val_candidates, dtype=np.float32)) > 0)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU for the duration of ``fit``; the caller's setting is restored."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _arch(cfg: TrainConfig, images: torch.Tensor, num_classes: int) -> dict[str, Any]:
    return {"backbone": cfg.backbone, "in_channels": int(images.shape[1]), "image_size": int(images.shape[2]),
            "num_classes": int(num_classes), "proj_hidden": cfg.proj_hidden, "proj_dim": cfg.proj_dim}


def _new_state(cfg: TrainConfig, arch: dict[str, Any], mean: torch.Tensor, std: torch.Tensor,
               device: torch.device, n: int) -> _State:
    model = CoRegEnsemble(arch, queue_size=cfg.queue_size, with_momentum=True)
    model.mean.copy_(mean)
    model.std.copy_(std)
    model.to(device)
    arch["feature_dim"] = model.net1.feature_dim
    optimizers = [torch.optim.SGD(net.query_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay) for net in (model.net1, model.net2)]
    return _State(model, optimizers, [LossHistory(cfg.loss_history, n) for _ in range(2)])


def cosine_lr(cfg: TrainConfig, epoch: int) -> float:
    """Cosine from ``lr`` (epoch 0) towards ``lr * lr_min_factor`` over all ``cfg.epochs``."""
    lo = cfg.lr * cfg.lr_min_factor
    return lo + (cfg.lr - lo) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- epochs


def _run_epoch(run: _Run, state: _State, epoch: int) -> None:
    cfg = run.cfg
    start = time.perf_counter()
    lr = cosine_lr(cfg, epoch)
    for opt in state.optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    warmup = epoch < cfg.warmup_epochs
    record = _warmup_epoch(run, state, epoch) if warmup else _coreg_epoch(run, state, epoch)
    hit = _hit_rate(state.model, run.data, cfg.eval_batch_size) if run.data.val_images is not None else None
    if hit is not None and run.dist is not None:  # the same model selection on every rank
        hit = run.dist.broadcast_float(hit)
    record = {"epoch": epoch + 1, "phase": "warmup" if epoch < cfg.warmup_epochs else "coreg", "lr": lr,
              **record, "val_hit_rate": hit, "seconds": round(time.perf_counter() - start, 3)}
    state.history.append(record)
    state.next_epoch = epoch + 1
    selectable = epoch + 1 >= cfg.first_selectable_epoch()
    if hit is not None and selectable and (state.best_metric is None or hit >= state.best_metric):
        state.best_metric, state.best_epoch = hit, epoch + 1
        if run.main:
            _save_model(run.out_dir / "model.pt", state, epoch + 1, hit)
    if run.main:
        _save_checkpoint(run, state)
        write_json(run.out_dir / "history.json", state.history)
    run.barrier()
    log.info("epoch %d/%d %s loss %.4f val_hit_rate %s (%.1fs)", epoch + 1, cfg.epochs, record["phase"],
             record["loss"], "-" if hit is None else f"{hit:.4f}", record["seconds"])


def _mean_stats(per_net: list[dict[str, float]]) -> dict[str, Any]:
    keys = ("loss", "l_x", "l_u", "l_proto", "l_con", "l_penalty")
    out: dict[str, Any] = {k: float(np.mean([s.get(k, 0.0) for s in per_net])) for k in keys}
    out["loss_net1"], out["loss_net2"] = per_net[0]["loss"], per_net[1]["loss"]
    return out


def _progress_bar(run: _Run, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=not run.progress, dynamic_ncols=True)


def _warmup_epoch(run: _Run, state: _State, epoch: int) -> dict[str, Any]:
    """Each net alone: partial CE + confidence penalty on a strong view, batch warmup_batch_size."""
    cfg, data = run.cfg, run.data
    n = data.images.shape[0]
    steps = math.ceil(n / cfg.warmup_batch_size)
    per_net = []
    with _progress_bar(run, 2 * steps, f"warm-up {epoch + 1}/{cfg.epochs}") as bar:
        for net_id, net in enumerate((state.model.net1, state.model.net2)):
            seed = derive_seed(cfg.seed, _WARMUP, epoch, net_id)
            order = torch.randperm(n, generator=_generator(derive_seed(seed, 0))).tolist()
            dataset = MultiViewDataset(data.images, data.augmenter, "strong", derive_seed(seed, 1))
            loader = make_loader(dataset, order, cfg.warmup_batch_size, cfg.num_workers, derive_seed(seed, 2),
                                 pin_memory=run.device.type == "cuda")
            net.train()
            sums = {"loss": 0.0, "l_x": 0.0, "l_penalty": 0.0}
            for views, idx in loader:
                if run.dist is not None:
                    values = _warmup_step_dist(run, state, net_id, net, views, idx)
                else:
                    logits = net(views.to(run.device, non_blocking=True))
                    pce = L.partial_cross_entropy(logits, data.candidates[idx.to(run.device)])
                    penalty = L.confidence_penalty(logits)
                    loss = pce + cfg.confidence_penalty * penalty
                    _step(state.optimizers[net_id], loss)
                    values = [float(v.detach()) for v in (loss, pce, penalty)]
                for key, value in zip(("loss", "l_x", "l_penalty"), values, strict=True):
                    sums[key] += value
                bar.update(1)
                bar.set_postfix(net=net_id + 1, loss=f"{values[0]:.3f}")
            per_net.append({k: v / steps for k, v in sums.items()})
    return {**_mean_stats(per_net), "clean_net1": None, "clean_net2": None, "per_class_clean": None,
            "classes_without_clean": None, "ramp": 0.0, "regularisers": False}


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _predict_train(run: _Run, state: _State, epoch: int) -> list[torch.Tensor]:
    """Softmax of both nets on one seeded weak view of every training sample (eval mode).

    Under torchrun each rank predicts only its contiguous chunk of the samples and the chunks
    are all-gathered: the pass costs 1/world of the single-process pass per rank, and every rank
    ends with the same tensor (the split must be identical on all ranks). The views of sample
    i depend only on i and the eval mode uses running BatchNorm statistics, so the result does
    not depend on how the rows are divided.
    """
    cfg, data = run.cfg, run.data
    n = data.images.shape[0]
    rows = range(n) if run.dist is None else range(*run.dist.bounds(n))
    dataset = MultiViewDataset(data.images, data.augmenter, "weak", derive_seed(cfg.seed, _EVAL, epoch))
    loader = make_loader(dataset, rows, cfg.eval_batch_size, cfg.num_workers,
                         derive_seed(cfg.seed, _EVAL, epoch, 1), pin_memory=run.device.type == "cuda")
    nets = (state.model.net1, state.model.net2)
    for net in nets:
        net.eval()
    k = data.candidates.shape[1]
    outs: list[list[torch.Tensor]] = [[torch.zeros((0, k), device=run.device)] for _ in nets]
    for views, _ in loader:
        views = views.to(run.device, non_blocking=True)
        for i, net in enumerate(nets):
            outs[i].append(F.softmax(net(views), dim=1))
    predictions = [torch.cat(o) for o in outs]
    if run.dist is not None:
        predictions = [run.dist.gather_rows(p, n) for p in predictions]
    return predictions


def _check_trusted(trusted: np.ndarray | None, n: int) -> np.ndarray | None:
    if trusted is None:
        return None
    trusted = np.asarray(trusted, dtype=bool)
    if trusted.shape != (n,):
        raise CoregError(f"training: trusted mask must have shape ({n},), got {trusted.shape}")
    return trusted if trusted.any() else None


def clean_class_counts(aligned: torch.Tensor, candidates: torch.Tensor, clean: np.ndarray) -> list[int]:
    """Clean samples per class, each counted under its pseudo-label (argmax of the aligned prediction within S).

    The trainer knows no true label, so this is what it can report. A class whose count drops to
    zero is no longer trained on as labelled data by the peer: the GMM tends to drop whole classes
    whose candidate sets are systematically wrong (instance-dependent VLM noise) or while the nets
    are still nearly flat within S (short warm-ups), and co-guessing does not bring them back.
    """
    pseudo = L.restrict_to_candidates(aligned, candidates).argmax(dim=1).cpu().numpy()
    return np.bincount(pseudo[np.asarray(clean, dtype=bool)], minlength=aligned.shape[1]).tolist()


def _split(run: _Run, state: _State, epoch: int) -> tuple[list[torch.Tensor], list[np.ndarray], list[np.ndarray]]:
    """Steps 1-3 of the method for both nets: aligned predictions, clean weights and clean masks."""
    cfg = run.cfg
    aligned, weights, clean = [], [], []
    predictions = _predict_train(run, state, epoch)  # the same on every rank (all-gathered)
    for i, probs in enumerate(predictions):
        p = L.distribution_alignment(probs)
        averaged = state.loss_histories[i].update(L.max_candidate_loss(p, run.data.candidates))
        w, c = gmm_clean_weights(averaged.numpy(), cfg.clean_threshold, derive_seed(cfg.seed, _GMM, epoch, i) % 2**32)
        if run.data.trusted is not None:
            # Few-shot human labels are not noisy: whatever the GMM says, both nets train on them as clean.
            w, c = np.where(run.data.trusted, 1.0, w).astype(w.dtype), c | run.data.trusted
        aligned.append(p)
        weights.append(w)
        clean.append(c)
    return aligned, weights, clean


def _coreg_epoch(run: _Run, state: _State, epoch: int) -> dict[str, Any]:
    """Split with both nets, then train f1 on f2's split and f2 on f1's split (co-divide)."""
    aligned, weights, clean = _split(run, state, epoch)
    per_net = []
    for net_id in (0, 1):
        peer_id = 1 - net_id
        per_net.append(_train_coreg_net(run, state, epoch, net_id, aligned[peer_id], weights[peer_id],
                                        clean[peer_id], clean_sizes=(int(clean[0].sum()), int(clean[1].sum()))))
    reg = epoch >= run.cfg.warmup_epochs + run.cfg.reg_start_offset
    per_class = [clean_class_counts(aligned[i], run.data.candidates, clean[i]) for i in (0, 1)]
    missing = [[k for k, count in enumerate(counts) if count == 0] for counts in per_class]
    for i, classes in enumerate(missing):
        if classes and run.main:
            log.warning("epoch %d: net%d's clean split has no sample of class(es) %s (by pseudo-label); its peer "
                        "gets no labelled rows of them this epoch. Persisting over epochs usually means a too short "
                        "warm-up or class-wide annotation errors (history.json: per_class_clean)",
                        epoch + 1, i + 1, classes)
    return {**_mean_stats(per_net), "clean_net1": int(clean[0].sum()), "clean_net2": int(clean[1].sum()),
            "per_class_clean": per_class, "classes_without_clean": max(len(m) for m in missing),
            "ramp": _ramp(run.cfg, epoch), "regularisers": reg}


def _ramp(cfg: TrainConfig, progress_epoch: float) -> float:
    """r(e): 0 at the end of warm-up, 1 after ``rampup_epochs`` more (fractional epochs allowed)."""
    return float(min(max((progress_epoch - cfg.warmup_epochs) / cfg.rampup_epochs, 0.0), 1.0))


def _batches(run: _Run, indices: np.ndarray, seed: int, cycle: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of training views of ``indices``; a fresh order (and fresh views) for every pass."""
    cfg = run.cfg
    passes = 0
    while True:
        order = indices[torch.randperm(len(indices), generator=_generator(derive_seed(seed, passes, 0))).numpy()]
        dataset = MultiViewDataset(run.data.images, run.data.augmenter, "train", derive_seed(seed, passes, 1))
        yield from make_loader(dataset, order.tolist(), cfg.batch_size, cfg.num_workers, derive_seed(seed, passes, 2),
                               pin_memory=run.device.type == "cuda")
        passes += 1
        if not cycle:
            return


def _test_pause(epoch: int, step: int) -> None:
    """Test hook, off by default: with ``COREG_TEST_PAUSE_AT_STEP=<epoch>:<step>:<marker file>`` set, after
    Co-Reg step ``<step>`` (0-based) of ``<epoch>`` (1-based, as in history.json) write the marker and sleep,
    so tests/test_faults.py can SIGKILL training mid-epoch without guessing how long an epoch lasts."""
    spec = os.environ.get("COREG_TEST_PAUSE_AT_STEP", "").split(":", 2)
    if len(spec) == 3 and spec[:2] == [str(epoch + 1), str(step)]:
        Path(spec[2]).write_text(f"{epoch + 1}:{step}\n", encoding="utf-8")
        time.sleep(3600)


def _train_coreg_net(run: _Run, state: _State, epoch: int, net_id: int, peer_aligned: torch.Tensor,
                     weights: np.ndarray, clean: np.ndarray, clean_sizes: tuple[int, int]) -> dict[str, float]:
    """One epoch of one net on its peer's split."""
    cfg = run.cfg
    nets = (state.model.net1, state.model.net2)
    net, peer = nets[net_id], nets[1 - net_id]
    net.train()
    peer.eval()
    net.reset_key_encoder()
    lab_idx, unl_idx = np.flatnonzero(clean), np.flatnonzero(~clean)
    seed = derive_seed(cfg.seed, _COREG, epoch, net_id)
    lab_iter = _batches(run, lab_idx, derive_seed(seed, 1), cycle=False) if len(lab_idx) else None
    unl_iter = _batches(run, unl_idx, derive_seed(seed, 2), cycle=len(lab_idx) > 0) if len(unl_idx) else None
    steps = math.ceil((len(lab_idx) or len(unl_idx)) / cfg.batch_size)
    mix_gen = _generator(derive_seed(seed, 3))
    w_all = torch.as_tensor(weights, dtype=torch.float32, device=run.device)
    reg = epoch >= cfg.warmup_epochs + cfg.reg_start_offset
    sums: dict[str, float] = {}
    desc = f"co-reg {epoch + 1}/{cfg.epochs} net{net_id + 1}"
    with _progress_bar(run, steps, desc) as bar:
        for step in range(steps):
            lab = next(lab_iter) if lab_iter is not None else None
            unl = next(unl_iter) if unl_iter is not None else None
            ramp = _ramp(cfg, epoch + step / steps)
            step_fn = _coreg_step if run.dist is None else _coreg_step_dist
            stats = step_fn(run, state, net_id, net, peer, lab, unl, peer_aligned, w_all, ramp, reg, mix_gen)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", clean=f"{clean_sizes[0]}/{clean_sizes[1]}")
            _test_pause(epoch, step)
    return {k: v / steps for k, v in sums.items()}


def _coreg_step(run: _Run, state: _State, net_id: int, net: CoRegNet, peer: CoRegNet, lab: tuple | None,
                unl: tuple | None, peer_aligned: torch.Tensor, w_all: torch.Tensor, ramp: float, reg: bool,
                mix_gen: torch.Generator) -> dict[str, float]:
    """One optimisation step of ``net`` on a labelled and an unlabelled batch (either may be absent)."""
    cfg, dev, cand = run.cfg, run.device, run.data.candidates
    parts = [b for b in (lab, unl) if b is not None]
    nl = 0 if lab is None else lab[0].shape[0]
    w1, w2, s1, s2 = (torch.cat([b[v].to(dev, non_blocking=True) for b in parts]) for v in range(4))
    nb = w1.shape[0]

    # Weak views: targets (no gradient) and the contrastive queries (gradient once L_con is on).
    with torch.set_grad_enabled(reg):
        logits_w, z_w = net(torch.cat([w1, w2]), with_proj=True)
    probs_w = F.softmax(logits_w.detach(), dim=1)
    p1, p2, z_q = probs_w[:nb], probs_w[nb:], z_w[:nb]
    targets = []
    if lab is not None:
        idx_l = lab[4].to(dev)
        targets.append(L.co_pseudo_label_targets(peer_aligned[idx_l], cand[idx_l], p1[:nl], p2[:nl], w_all[idx_l],
                                                 cfg.sharpen_temperature))
    if unl is not None:
        with torch.no_grad():
            peer_p = F.softmax(peer(torch.cat([w1[nl:], w2[nl:]])), dim=1)
        nu = nb - nl
        targets.append(L.unlabelled_targets(p1[nl:], p2[nl:], peer_p[:nu], peer_p[nu:], cfg.sharpen_temperature))
    t = torch.cat(targets)

    # MixMatch on the strong views: rows are [s1_l, s2_l, s1_u, s2_u].
    inputs = torch.cat([s1[:nl], s2[:nl], s1[nl:], s2[nl:]])
    mix_t = torch.cat([t[:nl], t[:nl], t[nl:], t[nl:]])
    mixed_x, mixed_t, _ = L.mixmatch(inputs, mix_t, cfg.mixup_alpha, mix_gen)
    out = net(mixed_x, with_proj=reg)
    logits_m, z_m = out if reg else (out, None)
    n_lab_rows = 2 * nl
    l_x = L.mixed_ce_loss(logits_m[:n_lab_rows], mixed_t[:n_lab_rows])
    l_u = L.mixed_mse_loss(logits_m[n_lab_rows:], mixed_t[n_lab_rows:])
    loss = l_x + ramp * cfg.lambda_u * l_u
    stats = {"l_x": float(l_x.detach()), "l_u": float(l_u.detach()), "l_proto": 0.0, "l_con": 0.0}

    keys = clean_flags = None
    if reg:
        prototypes = state.model.prototypes.clone()
        l_proto = L.prototype_loss(z_m, prototypes, mixed_t, n_lab_rows, cfg.proto_temperature)
        keys = net.encode_keys(s1)
        labels = t.argmax(dim=1)
        clean_flags = torch.arange(nb, device=dev) < nl
        l_con = L.supervised_contrastive_loss(
            z_q, keys, net.queue_feats.clone(), net.queue_targets.argmax(dim=1), net.queue_clean.clone(),
            net.queue_valid.clone(), labels, clean_flags, cfg.con_temperature)
        loss = loss + cfg.reg_weight * (l_proto + l_con)
        stats.update(l_proto=float(l_proto.detach()), l_con=float(l_con.detach()))
    _step(state.optimizers[net_id], loss)
    stats["loss"] = float(loss.detach())

    with torch.no_grad():
        if nl > 0:  # shared prototypes: EMA of the training net's weak-view embeddings of labelled rows
            state.model.prototypes.copy_(L.update_prototypes(state.model.prototypes, z_q[:nl].detach(),
                                                             t[:nl].argmax(dim=1), cfg.proto_momentum))
        if reg:
            net.momentum_update(cfg.key_momentum)
            net.enqueue(keys, t, clean_flags)
    return stats


@torch.no_grad()
def _hit_rate(model: CoRegEnsemble, data: _Data, batch_size: int) -> float:
    """Share of validation samples whose ensemble argmax lies in their candidate set."""
    assert data.val_images is not None and data.val_candidates is not None
    model.eval()
    hits = 0
    for i in range(0, data.val_images.shape[0], batch_size):
        pred = model(model.normalize(data.val_images[i:i + batch_size])).argmax(dim=1)
        cand = data.val_candidates[i:i + batch_size]
        hits += int(cand[torch.arange(pred.shape[0], device=pred.device), pred].sum())
    return hits / data.val_images.shape[0]


# ----------------------------------------------------------------------------- files


def _model_payload(state: _State, epoch: int, metric: float | None) -> dict[str, Any]:
    return model_payload(state.model, epoch, metric)


def model_payload(model: CoRegEnsemble, epoch: int, metric: float | None) -> dict[str, Any]:
    """The ``model.pt`` dictionary :func:`load_trained` reads (shared with the baselines in coreg.baselines)."""
    return {
        "format": MODEL_FORMAT, "version": FORMAT_VERSION, "arch": dict(model.arch),
        "mean": model.mean.detach().cpu(), "std": model.std.detach().cpu(),
        "net1": _cpu(model.net1.query_state_dict()), "net2": _cpu(model.net2.query_state_dict()),
        "prototypes": model.prototypes.detach().cpu(), "epoch": int(epoch),
        "selection_metric": "val_candidate_hit_rate" if metric is not None else None, "metric": metric,
    }


def _cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_cpu(v) for v in tree]
    return tree


def _save_model(path: Path, state: _State, epoch: int, metric: float | None) -> None:
    save_model(path, state.model, epoch, metric)


def save_model(path: Path, model: CoRegEnsemble, epoch: int, metric: float | None) -> None:
    """Write ``model.pt`` atomically: a reader never sees a half-written model."""
    with atomic_path(path) as tmp:
        torch.save(model_payload(model, epoch, metric), tmp)


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np_state = rng["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def _save_checkpoint(run: _Run, state: _State) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "next_epoch": state.next_epoch,
        "config": run.cfg.model_dump(mode="json"), "n": int(run.data.images.shape[0]),
        "k": int(run.data.candidates.shape[1]),
        "model": _cpu(state.model.state_dict()),
        "optimizers": [_cpu(opt.state_dict()) for opt in state.optimizers],
        "loss_history": [h.state() for h in state.loss_histories],
        "best_metric": state.best_metric, "best_epoch": state.best_epoch, "history": state.history,
        "rng": _rng_state(),
    }
    with atomic_path(run.out_dir / "checkpoints" / "last.pt") as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(state: _State, path: Path, cfg: TrainConfig, n: int, k: int, device: torch.device) -> None:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CoregError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start afresh") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CoregError(f"{path}: not a coreg checkpoint")
    if (ckpt["n"], ckpt["k"]) != (n, k):
        raise CoregError(f"{path}: checkpoint is for {ckpt['n']} samples x {ckpt['k']} classes, "
                         f"the data has {n} x {k}")
    now = cfg.model_dump(mode="json")
    for key, value in ckpt["config"].items():
        if key not in RESUME_FREE_FIELDS and now.get(key) != value:
            raise CoregError(f"{path}: checkpoint was trained with train.{key}={value!r}, config now has "
                             f"{now.get(key)!r}; resume needs the same settings")
    state.model.load_state_dict(ckpt["model"])
    for opt, opt_state in zip(state.optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    for hist, rows in zip(state.loss_histories, ckpt["loss_history"], strict=True):
        hist.load(rows)
    state.next_epoch = int(ckpt["next_epoch"])
    state.best_metric, state.best_epoch = ckpt["best_metric"], ckpt["best_epoch"]
    state.history = list(ckpt["history"])
    _set_rng_state(ckpt["rng"])


# ----------------------------------------------------------------------------- distributed steps
# The same computations as ``_warmup_epoch``'s step and ``_coreg_step`` on the same global batch,
# with this rank forwarding only its chunk of the rows (see coreg/train/distributed.py).


def _dist_step(run: _Run, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward of this rank's share of the loss, gradients summed over ranks, one optimiser step."""
    assert run.dist is not None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.dist.sum_grads([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()


def _warmup_step_dist(run: _Run, state: _State, net_id: int, net: CoRegNet, views: torch.Tensor,
                      idx: torch.Tensor) -> list[float]:
    ctx, cfg = run.dist, run.cfg
    assert ctx is not None
    n = views.shape[0]
    a, b = ctx.bounds(n)
    logits = net(views[a:b].to(run.device))
    pce = distributed.share(L.partial_cross_entropy(logits, run.data.candidates[idx[a:b].to(run.device)]), b - a, n)
    penalty = distributed.share(L.confidence_penalty(logits), b - a, n)
    loss = pce + cfg.confidence_penalty * penalty
    _dist_step(run, state.optimizers[net_id], loss)
    return ctx.sum([float(v.detach()) for v in (loss, pce, penalty)])


def _coreg_step_dist(run: _Run, state: _State, net_id: int, net: CoRegNet, peer: CoRegNet, lab: tuple | None,
                     unl: tuple | None, peer_aligned: torch.Tensor, w_all: torch.Tensor, ramp: float, reg: bool,
                     mix_gen: torch.Generator) -> dict[str, float]:
    """``_coreg_step`` on the global batch, data-parallel: every rank holds the batch, forwards its rows."""
    ctx, cfg, dev, cand = run.dist, run.cfg, run.device, run.data.candidates
    assert ctx is not None
    parts = [b for b in (lab, unl) if b is not None]
    nl = 0 if lab is None else lab[0].shape[0]
    w1, w2, s1, s2 = (torch.cat([b[v].to(dev, non_blocking=True) for b in parts]) for v in range(4))
    nb = w1.shape[0]
    nu = nb - nl
    a, b = ctx.bounds(nb)

    # Weak views of this rank's rows (BatchNorm statistics over the rows of all ranks).
    with torch.set_grad_enabled(reg):
        logits_w, z_w = net(torch.cat([w1[a:b], w2[a:b]]), with_proj=True)
    probs_w = F.softmax(logits_w.detach(), dim=1)
    p1, p2 = ctx.gather_rows(probs_w[:b - a], nb), ctx.gather_rows(probs_w[b - a:], nb)
    z_q = ctx.gather_rows(z_w[:b - a], nb, grad=reg)
    targets = []
    if lab is not None:
        idx_l = lab[4].to(dev)
        targets.append(L.co_pseudo_label_targets(peer_aligned[idx_l], cand[idx_l], p1[:nl], p2[:nl], w_all[idx_l],
                                                 cfg.sharpen_temperature))
    if unl is not None:
        ua, ub = ctx.bounds(nu)
        with torch.no_grad():
            peer_p = F.softmax(peer(torch.cat([w1[nl + ua:nl + ub], w2[nl + ua:nl + ub]])), dim=1)
        q1, q2 = ctx.gather_rows(peer_p[:ub - ua], nu), ctx.gather_rows(peer_p[ub - ua:], nu)
        targets.append(L.unlabelled_targets(p1[nl:], p2[nl:], q1, q2, cfg.sharpen_temperature))
    t = torch.cat(targets)

    # MixMatch of the global batch (same generator on every rank); this rank trains on its mixed rows.
    inputs = torch.cat([s1[:nl], s2[:nl], s1[nl:], s2[nl:]])
    mix_t = torch.cat([t[:nl], t[:nl], t[nl:], t[nl:]])
    mixed_x, mixed_t, _ = L.mixmatch(inputs, mix_t, cfg.mixup_alpha, mix_gen)
    n_lab_rows, n_rows = 2 * nl, 2 * nb
    ma, mb = ctx.bounds(n_rows)
    out = net(mixed_x[ma:mb], with_proj=reg)
    logits_m, z_m = out if reg else (out, None)
    cut = min(max(n_lab_rows - ma, 0), mb - ma)  # this rank's labelled mixed rows come first
    my_t = mixed_t[ma:mb]
    l_x = distributed.share(L.mixed_ce_loss(logits_m[:cut], my_t[:cut]), cut, n_lab_rows)
    l_u = distributed.share(L.mixed_mse_loss(logits_m[cut:], my_t[cut:]), mb - ma - cut, n_rows - n_lab_rows)
    loss = l_x + ramp * cfg.lambda_u * l_u
    l_proto = l_con = None
    keys = clean_flags = None
    if reg:
        assert z_m is not None
        prototypes = state.model.prototypes.clone()
        l_proto = (distributed.share(L.prototype_loss(z_m[:cut], prototypes, my_t[:cut], cut, cfg.proto_temperature),
                                     cut, n_lab_rows)
                   + distributed.share(L.prototype_loss(z_m[cut:], prototypes, my_t[cut:], 0, cfg.proto_temperature),
                                       mb - ma - cut, n_rows - n_lab_rows))
        keys = ctx.gather_rows(net.encode_keys(s1[a:b]), nb)
        labels = t.argmax(dim=1)
        clean_flags = torch.arange(nb, device=dev) < nl
        # Every rank computes the whole L_con (all queries are gathered, with gradients): each takes 1/world.
        l_con = L.supervised_contrastive_loss(
            z_q, keys, net.queue_feats.clone(), net.queue_targets.argmax(dim=1), net.queue_clean.clone(),
            net.queue_valid.clone(), labels, clean_flags, cfg.con_temperature) / ctx.world
        loss = loss + cfg.reg_weight * (l_proto + l_con)
    _dist_step(run, state.optimizers[net_id], loss)
    values = ctx.sum([float(v.detach()) if v is not None else 0.0 for v in (loss, l_x, l_u, l_proto, l_con)])
    stats = dict(zip(("loss", "l_x", "l_u", "l_proto", "l_con"), values, strict=True))

    with torch.no_grad():
        if nl > 0:  # the same EMA on every rank: the gathered embeddings of the global batch
            state.model.prototypes.copy_(L.update_prototypes(state.model.prototypes, z_q[:nl].detach(),
                                                             t[:nl].argmax(dim=1), cfg.proto_momentum))
        if reg:
            net.momentum_update(cfg.key_momentum)
            net.enqueue(keys, t, clean_flags)
    return stats
