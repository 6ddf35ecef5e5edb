"""Hand-computed checks of the Co-Reg loss functions and target builders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coreg.train import losses as L


def _logits(*probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_partial_cross_entropy_sums_candidate_mass() -> None:
    logits = _logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float64)
    # row 0: -log(0.25 + 0.25), row 1: -log(0.5)
    assert L.partial_cross_entropy(logits, mask).item() == pytest.approx(-math.log(0.5))
    full = torch.ones(2, 3, dtype=torch.float64)
    assert L.partial_cross_entropy(logits, full).item() == pytest.approx(0.0, abs=1e-12)


def test_confidence_penalty_is_negative_entropy() -> None:
    logits = _logits([0.5, 0.25, 0.25])
    expected = 0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)
    assert L.confidence_penalty(logits).item() == pytest.approx(expected)


def test_sharpen() -> None:
    out = L.sharpen(torch.tensor([[0.6, 0.4]], dtype=torch.float64), 0.5)
    assert out[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52])


def test_distribution_alignment_uniform_prior() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    out = L.distribution_alignment(probs)
    # mean [0.6, 0.4] / prior 0.5 = [1.2, 0.8]; row 0: [2/3, 1/4] normalised, row 1: [1/3, 3/4] normalised
    assert out[0].tolist() == pytest.approx([(2 / 3) / (2 / 3 + 1 / 4), (1 / 4) / (2 / 3 + 1 / 4)])
    assert out[1].tolist() == pytest.approx([(1 / 3) / (1 / 3 + 3 / 4), (3 / 4) / (1 / 3 + 3 / 4)])
    prior = torch.tensor([0.6, 0.4], dtype=torch.float64)
    assert torch.allclose(L.distribution_alignment(probs, prior), probs)  # prior equals the mean: unchanged


def test_max_candidate_loss_per_sample() -> None:
    aligned = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.float64)
    out = L.max_candidate_loss(aligned, mask)
    assert out.tolist() == pytest.approx([-math.log(0.2), -math.log(0.6)])


def test_co_pseudo_label_targets() -> None:
    peer = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1]], dtype=torch.float64)
    own = torch.tensor([[0.2, 0.4, 0.4]], dtype=torch.float64)
    out = L.co_pseudo_label_targets(peer, mask, own, own, torch.tensor([0.5]), 0.5)
    # q = [0, 0.6, 0.4]; 0.5 q + 0.5 pbar = [0.1, 0.5, 0.4]; squared = [0.01, 0.25, 0.16]
    assert out[0].tolist() == pytest.approx([0.01 / 0.42, 0.25 / 0.42, 0.16 / 0.42])


def test_restrict_to_candidates_without_mass_is_uniform_over_set() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    out = L.restrict_to_candidates(probs, torch.tensor([[0, 1, 1]]))
    assert out[0].tolist() == pytest.approx([0.0, 0.5, 0.5])


def test_unlabelled_targets_average_four_predictions() -> None:
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    out = L.unlabelled_targets(a, a, a, b, 1.0)
    assert out[0].tolist() == pytest.approx([0.75, 0.25])


def test_mixmatch_is_seeded_and_keeps_own_sample_dominant() -> None:
    targets = torch.eye(4)
    x1, t1, lam1 = L.mixmatch(targets.clone(), targets, 4.0, torch.Generator().manual_seed(3))
    x2, t2, lam2 = L.mixmatch(targets.clone(), targets, 4.0, torch.Generator().manual_seed(3))
    assert lam1 == lam2 and torch.equal(x1, x2) and torch.equal(t1, t2)
    assert lam1 >= 0.5
    assert torch.allclose(x1, t1)  # inputs and targets are mixed with the same lambda and permutation
    assert torch.allclose(t1.sum(dim=1), torch.ones(4))
    assert bool((t1.diagonal() >= lam1 - 1e-6).all())


def test_mixed_losses() -> None:
    logits = _logits([0.5, 0.5])
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert L.mixed_ce_loss(logits, target).item() == pytest.approx(math.log(2))
    assert L.mixed_mse_loss(logits, target).item() == pytest.approx(0.25)
    assert L.mixed_ce_loss(logits[:0], target[:0]).item() == 0.0


def test_prototype_loss_kl_and_mse() -> None:
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    protos = torch.eye(2, dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    p0 = math.e / (math.e + 1)
    expected_kl = -math.log(p0)
    expected_mse = ((1 - p0) ** 2 + (1 - p0) ** 2) / 2
    out = L.prototype_loss(z, protos, targets, n_labelled=1, temperature=1.0)
    assert out.item() == pytest.approx(expected_kl + expected_mse)
    assert L.prototype_loss(z, protos, targets, 2, 1.0).item() == pytest.approx(expected_kl)
    assert L.prototype_loss(z, protos, targets, 0, 1.0).item() == pytest.approx(expected_mse)


def test_prototype_update_equals_sequential_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(3, 5, generator=gen, dtype=torch.float64), dim=1)
    z = F.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2, 1, 2])
    m = 0.9
    reference = protos.clone()
    for zi, yi in zip(z, labels, strict=True):  # the reference implementation's per-sample loop
        reference[yi] = reference[yi] * m + (1 - m) * zi
    reference = F.normalize(reference, dim=1)
    assert torch.allclose(L.update_prototypes(protos, z, labels, m), reference, atol=1e-12)
    # a class absent from the batch keeps its (normalised) prototype
    out = L.update_prototypes(protos, z[:1], labels[:1], m)
    assert torch.allclose(out[:2], protos[:2])


def test_contrastive_masks_by_hand() -> None:
    labels = torch.tensor([0, 0, 1])
    clean = torch.tensor([True, False, True])
    queue_labels = torch.tensor([0, 1, 0])
    queue_clean = torch.tensor([True, True, False])
    queue_valid = torch.tensor([True, True, False])  # the third slot is empty and must not appear
    pos, keep = L.contrastive_masks(labels, clean, queue_labels, queue_clean, queue_valid)
    # columns: q0 q1 q2 k0 k1 k2 Q0(label 0, clean) Q1(label 1, clean)
    t, f = True, False
    assert pos.tolist() == [
        [f, f, f, t, f, f, t, f],  # clean label-0 anchor: own key + clean label-0 queue entry
        [f, f, f, f, t, f, f, f],  # unclean anchor: only its own key
        [f, f, f, f, f, t, f, t],  # clean label-1 anchor: own key + clean label-1 queue entry
    ]
    assert keep.tolist() == [
        [f, f, t, t, f, t, t, t],  # self, q1 and k1 (same label, q1 unclean) removed
        [f, f, t, f, t, t, f, t],  # self and every other label-0 column removed
        [t, t, f, t, t, t, t, t],  # only self removed
    ]


def test_contrastive_loss_value_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    args = (torch.tensor([0, 0]), torch.tensor([True, True]), torch.tensor([True, False]))
    temp = 0.5
    out = L.supervised_contrastive_loss(q, k, queue, *args, torch.tensor([1]), torch.tensor([True]), temp)
    # anchor label 1: own key positive (0.6), valid queue entry label 0 is a negative (0.0)
    a, b = 0.6 / temp, 0.0 / temp
    assert out.item() == pytest.approx(-(a - math.log(math.exp(a) + math.exp(b))))
    # same label and both clean: the queue entry becomes a second positive
    out2 = L.supervised_contrastive_loss(q, k, queue, *args, torch.tensor([0]), torch.tensor([True]), temp)
    log_den = math.log(math.exp(a) + math.exp(b))
    assert out2.item() == pytest.approx(-((a - log_den) + (b - log_den)) / 2)
    # same label but the anchor is unclean: the entry is removed entirely
    out3 = L.supervised_contrastive_loss(q, k, queue, *args, torch.tensor([0]), torch.tensor([False]), temp)
    assert out3.item() == pytest.approx(0.0, abs=1e-12)
