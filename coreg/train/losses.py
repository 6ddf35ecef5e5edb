"""Loss functions and target builders of Co-Reg, as pure tensor functions.

Every function works on whole batches with no per-sample Python loop, so it runs the same
on CPU and GPU and can be checked by hand on tiny inputs (``tests/test_losses.py``).
Probabilities are rows of a (B, K) tensor; candidate masks are (B, K) 0/1 or bool tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12


def partial_cross_entropy(logits: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-log(sum_{j in S} p_j)``.

    The partial-label likelihood: the network may put its mass on any candidate, since
    which one is true is unknown. Computed with log-sum-exp so tiny masses stay finite.
    """
    log_p = F.log_softmax(logits, dim=1)
    masked = log_p.masked_fill(candidate_mask <= 0, float("-inf"))
    return -torch.logsumexp(masked, dim=1).mean()


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_j p_j log p_j`` (negative entropy).

    Added to the warm-up loss it penalises over-confident predictions, so the first
    epochs do not lock in the annotators' noise before the clean split is learnt.
    """
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1).mean()


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raise each probability to ``1 / T`` and renormalise rows (T < 1 makes targets peakier)."""
    powered = probs.clamp_min(0).pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True).clamp_min(_EPS)


def distribution_alignment(probs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``normalise(p / (mean_over_data(p) / prior))`` with a uniform prior by default.

    Divides out the network's class bias (over-predicted classes are damped), so the
    max-candidate loss compares samples of different classes on the same footing.
    """
    k = probs.shape[1]
    if prior is None:
        prior = torch.full((k,), 1.0 / k, dtype=probs.dtype, device=probs.device)
    ratio = probs.mean(dim=0) / prior
    aligned = probs / ratio.clamp_min(_EPS)
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(_EPS)


def max_candidate_loss(aligned_probs: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log max_{j in S} p~_j`` (shape (B,)): low when a candidate is confidently predicted."""
    masked = aligned_probs.masked_fill(candidate_mask <= 0, 0.0)
    return -masked.max(dim=1).values.clamp_min(_EPS).log()


def restrict_to_candidates(probs: torch.Tensor, candidate_mask: torch.Tensor) -> torch.Tensor:
    """Zero the non-candidates and renormalise; a row with no mass left becomes uniform over S."""
    mask = (candidate_mask > 0).to(probs.dtype)
    restricted = probs * mask
    total = restricted.sum(dim=1, keepdim=True)
    uniform = mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.where(total > _EPS, restricted / total.clamp_min(_EPS), uniform)


def co_pseudo_label_targets(
    peer_aligned: torch.Tensor,
    candidate_mask: torch.Tensor,
    own_probs_w1: torch.Tensor,
    own_probs_w2: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Labelled-row target ``sharpen(w * q + (1 - w) * pbar, T)`` (Co-Pseudo-Labeling).

    ``q`` is the peer's aligned prediction restricted to the candidate set (the peer's view
    of which candidate is right); ``pbar`` is the training net's own mean prediction on the
    two weak views. A confidently clean sample (w near 1) trusts the candidates; a doubtful
    one leans on the network itself.
    """
    q = restrict_to_candidates(peer_aligned, candidate_mask)
    pbar = (own_probs_w1 + own_probs_w2) / 2
    w = weights.reshape(-1, 1).to(q.dtype)
    return sharpen(w * q + (1 - w) * pbar, temperature)


def unlabelled_targets(
    own_probs_w1: torch.Tensor,
    own_probs_w2: torch.Tensor,
    peer_probs_w1: torch.Tensor,
    peer_probs_w2: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Unlabelled-row target: sharpened mean of both nets on both weak views (co-guessing).

    No candidate restriction: this is what lets the method recover labels outside S.
    """
    mean = (own_probs_w1 + own_probs_w2 + peer_probs_w1 + peer_probs_w2) / 4
    return sharpen(mean, temperature)


def mixmatch(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp of a whole batch with a random permutation of itself; returns (inputs, targets, lambda).

    ``lambda ~ Beta(alpha, alpha)`` and ``lambda = max(lambda, 1 - lambda)`` so each mixed row
    stays closer to its own sample, which keeps the labelled/unlabelled row order meaningful.
    All randomness comes from ``generator`` (a CPU generator), so a seeded run is reproducible.
    """
    # torch has no generator-aware Beta sampler: draw a seed from the generator and use numpy.
    beta_seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    mixed_inputs = lam * inputs + (1 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    return mixed_inputs, mixed_targets, lam


def mixed_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy (L_x), mean over rows; zero for an empty batch."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mixed_mse_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between softmax and soft targets (L_u), mean over all entries; zero for an empty batch.

    MSE is bounded, so wrong co-guessed targets of the unlabelled rows cannot dominate.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return ((F.softmax(logits, dim=1) - targets) ** 2).mean()


def prototype_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    n_labelled: int,
    temperature: float,
) -> torch.Tensor:
    """L_proto: ``softmax(z . C / T)`` against the (mixed) targets.

    KL(target || prediction) for the first ``n_labelled`` rows, plus MSE (mean over entries)
    for the remaining unlabelled rows; absent parts contribute zero.
    """
    logits = embeddings @ prototypes.t() / temperature
    lab_logits, unl_logits = logits[:n_labelled], logits[n_labelled:]
    lab_t, unl_t = targets[:n_labelled], targets[n_labelled:]
    loss = logits.sum() * 0.0
    if n_labelled > 0:
        log_p = F.log_softmax(lab_logits, dim=1)
        loss = loss + (torch.xlogy(lab_t, lab_t) - lab_t * log_p).sum(dim=1).mean()
    if unl_logits.shape[0] > 0:
        loss = loss + mixed_mse_loss(unl_logits, unl_t)
    return loss


def update_prototypes(
    prototypes: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Return the prototypes after a sample-by-sample EMA over the batch, then L2-normalised.

    Exactly equal to the loop ``for z, y in rows: C[y] = m * C[y] + (1 - m) * z`` followed by
    row normalisation, but vectorised: the i-th of n rows of class y (in batch order) enters
    with weight ``(1 - m) * m**(n - 1 - i)`` and the old prototype decays by ``m**n``.
    """
    k = prototypes.shape[0]
    labels = labels.long()
    one_hot = F.one_hot(labels, k).to(embeddings.dtype)
    counts = one_hot.sum(dim=0)  # n per class
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # position of each row within its class
    exponent = counts[labels] - 1 - rank
    row_weight = (1 - momentum) * torch.pow(torch.full_like(exponent, momentum), exponent)
    decay = torch.pow(torch.full_like(counts, momentum), counts).unsqueeze(1)
    new = prototypes * decay
    new = new.index_add(0, labels, embeddings * row_weight.unsqueeze(1))
    return F.normalize(new, dim=1)


def supervised_contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue_feats: torch.Tensor,
    queue_labels: torch.Tensor,
    queue_clean: torch.Tensor,
    queue_valid: torch.Tensor,
    labels: torch.Tensor,
    clean: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_con: supervised contrastive loss with clean-aware positives.

    Anchors are the B queries; candidates are ``[queries; keys; valid queue entries]``.
    For anchor i: positives are candidates with the same pseudo-label where both i and the
    candidate are clean, plus i's own key; a same-label candidate that is not both-clean is
    removed from numerator and denominator (it may be a mislabelled positive, and must not be
    pushed away either); the anchor itself is excluded; all other candidates are negatives.
    """
    b = q.shape[0]
    contrast = contrastive_masks(labels, clean, queue_labels, queue_clean, queue_valid)
    positives, keep = contrast
    feats = torch.cat([q, k, queue_feats[queue_valid]], dim=0)
    logits = q @ feats.t() / temperature
    log_denominator = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    pos = positives.to(logits.dtype)
    per_anchor = -(log_prob * pos).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean() if b > 0 else logits.sum() * 0.0


def contrastive_masks(
    labels: torch.Tensor,
    clean: torch.Tensor,
    queue_labels: torch.Tensor,
    queue_clean: torch.Tensor,
    queue_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, kept) boolean masks of shape (B, 2B + n_valid) for :func:`supervised_contrastive_loss`.

    Column order: the B queries, the B keys, then the valid queue entries.
    """
    b = labels.shape[0]
    device = labels.device
    clean = clean.bool()
    all_labels = torch.cat([labels, labels, queue_labels[queue_valid]])
    all_clean = torch.cat([clean, clean, queue_clean[queue_valid].bool()])
    same = labels.unsqueeze(1) == all_labels.unsqueeze(0)
    both_clean = clean.unsqueeze(1) & all_clean.unsqueeze(0)
    rows = torch.arange(b, device=device)
    own_key = torch.zeros_like(same)
    own_key[rows, rows + b] = True
    self_cmp = torch.zeros_like(same)
    self_cmp[rows, rows] = True
    positives = ((same & both_clean) | own_key) & ~self_cmp
    removed = (same & ~both_clean & ~own_key) | self_cmp
    return positives, ~removed
