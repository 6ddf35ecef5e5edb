"""End-to-end checks of Co-Reg training on a tiny synthetic data set (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coreg.config import TrainConfig
from coreg.errors import CoregError
from coreg.train import FitResult, fit, load_trained, predict_logits
from coreg.train import trainer as trainer_module
from coreg.train.backbones import build_backbone
from coreg.train.clean_split import LossHistory, gmm_clean_weights
from coreg.train.network import CoRegEnsemble, CoRegNet
from coreg.train.trainer import clean_class_counts

K = 4
SIZE = 16


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey 16x16 images: class c lights up quadrant c, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    images = rng.normal(60, 25, (n, 1, SIZE, SIZE))
    half = SIZE // 2
    for c in range(K):
        r, col = divmod(c, 2)
        images[y == c, 0, r * half + 2:r * half + half - 2, col * half + 2:col * half + half - 2] += 150
    return np.clip(images, 0, 255).astype(np.uint8), y


def noisy_candidates(y: np.ndarray, q: float, eta: float, seed: int) -> np.ndarray:
    """The NPLL protocol: wrong labels enter with prob q; with prob eta the true label is swapped out."""
    rng = np.random.default_rng(seed)
    n = len(y)
    cand = (rng.random((n, K)) < q).astype(np.float32)
    cand[np.arange(n), y] = 1.0
    for i in np.flatnonzero(rng.random(n) < eta):
        cand[i, y[i]] = 0.0
        free = [j for j in range(K) if cand[i, j] == 0 and j != y[i]]
        if free:
            cand[i, rng.choice(free)] = 1.0
    return cand


def tiny_config(**overrides: object) -> TrainConfig:
    base = {"backbone": "small_cnn", "epochs": 6, "warmup_epochs": 2, "reg_start_offset": 1, "rampup_epochs": 2,
            "batch_size": 32, "warmup_batch_size": 16, "eval_batch_size": 128, "queue_size": 64, "proj_hidden": 64,
            "proj_dim": 32, "lr": 0.05, "device": "cpu", "seed": 7}
    base.update(overrides)
    return TrainConfig(**base)


# The end-to-end reference run. Its warm-up must leave each network (not only their sum) a usable
# classifier, because co-divide judges every net by its own max-candidate loss: with lr 0.05 and
# two warm-up epochs each net's logits span ~0.2 and are dominated by its class bias (per-net
# accuracy 0.3-0.75 while the ensemble looks fine), the split of one net then contains no
# sample of a whole class, and the peer trained on it forgets that class for good. lr 0.01 is
# the method's own rate; five warm-up epochs make each net reliable on this data.
REFERENCE = {"lr": 0.01, "warmup_epochs": 5, "epochs": 9}


def reference_config(**overrides: object) -> TrainConfig:
    return tiny_config(**{**REFERENCE, **overrides})


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x, y = make_images(200, seed=0)
    cand = noisy_candidates(y, q=0.3, eta=0.3, seed=1)
    x_val, y_val = make_images(60, seed=2)
    x_test, y_test = make_images(200, seed=3)
    return {"x": x, "y": y, "cand": cand, "x_val": x_val, "cand_val": noisy_candidates(y_val, 0.3, 0.1, 4),
            "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def reference_run(data: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> FitResult:
    out = tmp_path_factory.mktemp("reference")
    return fit(data["x"], data["cand"], reference_config(), out, horizontal_flip=False, val_images=data["x_val"],
               val_candidates=data["cand_val"], progress=False)


def _model_state(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _model_state(a), _model_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _test_accuracy(model_path: Path, data: dict[str, np.ndarray]) -> float:
    model = load_trained(model_path)
    return float((predict_logits(model, data["x_test"]).argmax(1) == data["y_test"]).mean())


def test_learns_above_candidate_noise(reference_run: FitResult, data: dict[str, np.ndarray]) -> None:
    cfg = reference_config()
    # The model the trainer selected (on the validation hit rate, among the selectable epochs).
    assert reference_run.best_epoch is not None and reference_run.best_val_hit_rate is not None
    assert cfg.first_selectable_epoch() <= reference_run.best_epoch <= cfg.epochs
    assert load_trained(reference_run.model_path).selected_epoch == reference_run.best_epoch
    acc = _test_accuracy(reference_run.model_path, data)
    partial_accuracy = float(data["cand"][np.arange(len(data["y"])), data["y"]].mean())  # about 0.7
    assert acc > 0.85 and acc > partial_accuracy + 0.1
    phases = [h["phase"] for h in reference_run.history]
    assert phases == ["warmup"] * cfg.warmup_epochs + ["coreg"] * (cfg.epochs - cfg.warmup_epochs)
    last = reference_run.history[-1]
    assert last["regularisers"] and last["l_con"] > 0 and last["l_proto"] > 0  # every loss path ran
    assert last["clean_net1"] > 0 and last["clean_net2"] > 0
    # Per-class clean counts (by pseudo-label) partition each net's clean split.
    k = data["cand"].shape[1]
    assert [len(c) for c in last["per_class_clean"]] == [k, k]
    assert [sum(c) for c in last["per_class_clean"]] == [last["clean_net1"], last["clean_net2"]]
    assert last["classes_without_clean"] == max(c.count(0) for c in last["per_class_clean"])
    assert reference_run.history[0]["per_class_clean"] is None  # warm-up has no split


def test_clean_class_counts_use_the_pseudo_label_within_the_candidate_set() -> None:
    aligned = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    cand = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    clean = np.array([True, True, False, True])
    # row 0: best candidate is class 2 (class 1 is not a candidate); row 1: class 2; row 2 is not clean; row 3: 0
    assert clean_class_counts(aligned, cand, clean) == [1, 0, 2]


def test_coreg_epochs_do_not_undo_the_warm_up(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Regression: Co-Reg epochs once took a 0.98-1.0 warm-up ensemble down to 0.5-0.77 by erasing classes.

    Each co-divide split must keep every class in its clean (labelled) part, and the accuracy
    after the last Co-Reg epoch must not fall clearly below the accuracy at the end of warm-up.
    """
    cfg = reference_config()
    kwargs = {"horizontal_flip": False, "progress": False}
    fit(data["x"], data["cand"], cfg, tmp_path, stop_after_epoch=cfg.warmup_epochs, **kwargs)
    after_warmup = _test_accuracy(tmp_path / "model.pt", data)  # no validation data: the last epoch is kept
    split_classes: list[tuple[int, ...]] = []
    original = trainer_module.gmm_clean_weights

    def recording(losses: np.ndarray, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        w, clean = original(losses, threshold, seed)
        split_classes.append(tuple(int(c) for c in np.unique(data["y"][clean])))
        return w, clean

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "gmm_clean_weights", recording)
        result = fit(data["x"], data["cand"], cfg, tmp_path, resume=True, **kwargs)
    after_coreg = _test_accuracy(tmp_path / "model.pt", data)
    assert result.history[-1]["phase"] == "coreg" and len(split_classes) == 2 * (cfg.epochs - cfg.warmup_epochs)
    assert all(classes == tuple(range(K)) for classes in split_classes), split_classes
    assert after_warmup > 0.85
    assert after_coreg >= after_warmup - 0.05, (after_warmup, after_coreg)


def test_two_seeded_runs_are_identical(reference_run: FitResult, data: dict[str, np.ndarray],
                                       tmp_path: Path) -> None:
    fit(data["x"], data["cand"], reference_config(), tmp_path, horizontal_flip=False, val_images=data["x_val"],
        val_candidates=data["cand_val"], progress=False)
    _assert_same_weights(reference_run.model_path.parent, tmp_path)


def test_resume_matches_uninterrupted_run(reference_run: FitResult, data: dict[str, np.ndarray],
                                          tmp_path: Path) -> None:
    kwargs = {"horizontal_flip": False, "val_images": data["x_val"], "val_candidates": data["cand_val"],
              "progress": False}
    first = fit(data["x"], data["cand"], reference_config(), tmp_path, stop_after_epoch=7, **kwargs)
    assert len(first.history) == 7  # stopped inside the Co-Reg phase
    resumed = fit(data["x"], data["cand"], reference_config(), tmp_path, resume=True, **kwargs)
    _assert_same_weights(reference_run.model_path.parent, tmp_path)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in reference_run.history]
    assert resumed.best_epoch == reference_run.best_epoch
    with pytest.raises(CoregError, match="epochs"):
        fit(data["x"], data["cand"], reference_config(epochs=10), tmp_path, resume=True, **kwargs)


def test_worker_processes_give_the_same_weights(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    cfg = {"epochs": 2, "warmup_epochs": 1, "reg_start_offset": 0}  # one warm-up and one Co-Reg epoch
    fit(data["x"], data["cand"], tiny_config(**cfg), tmp_path / "a", horizontal_flip=True, progress=False)
    fit(data["x"], data["cand"], tiny_config(**cfg, num_workers=2), tmp_path / "b", horizontal_flip=True,
        progress=False)
    _assert_same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("split", ["all_clean", "none_clean"])
def test_empty_split_does_not_crash(split: str, data: dict[str, np.ndarray], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def forced(losses: np.ndarray, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        w = np.ones(len(losses)) if split == "all_clean" else np.zeros(len(losses))
        return w, w > threshold

    monkeypatch.setattr(trainer_module, "gmm_clean_weights", forced)
    result = fit(data["x"][:80], data["cand"][:80], tiny_config(epochs=3, warmup_epochs=1, reg_start_offset=0),
                 tmp_path, horizontal_flip=False, progress=False)
    last = result.history[-1]
    assert last["clean_net1"] == (80 if split == "all_clean" else 0)
    assert np.isfinite(last["loss"])
    assert result.model_path.exists() and result.best_val_hit_rate is None


def test_few_shot_labels_are_clean_in_both_nets(data: dict[str, np.ndarray], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the GMM calls every sample noisy, the few-shot rows stay in both nets' clean splits."""
    seen: list[np.ndarray] = []

    def none_clean(losses: np.ndarray, threshold: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        w = np.zeros(len(losses))
        return w, w > threshold

    real_train = trainer_module._train_coreg_net

    def spy(run, state, epoch, net_id, aligned, weights, clean, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(np.asarray(weights))
        return real_train(run, state, epoch, net_id, aligned, weights, clean, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "gmm_clean_weights", none_clean)
    monkeypatch.setattr(trainer_module, "_train_coreg_net", spy)
    trusted = np.zeros(80, dtype=bool)
    trusted[[3, 17, 42]] = True
    exact = data["cand"][:80].copy()
    exact[trusted] = np.eye(K, dtype=np.float32)[data["y"][:80][trusted]]
    result = fit(data["x"][:80], exact, tiny_config(epochs=3, warmup_epochs=1, reg_start_offset=0), tmp_path,
                 horizontal_flip=False, progress=False, trusted=trusted)
    assert result.history[-1]["clean_net1"] == 3 and result.history[-1]["clean_net2"] == 3
    assert len(seen) == 4  # two Co-Reg epochs x two nets
    for weights in seen:
        np.testing.assert_array_equal(weights[trusted], 1.0)
        np.testing.assert_array_equal(weights[~trusted], 0.0)


def test_single_correct_candidates_train(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    exact = np.eye(K, dtype=np.float32)[data["y"][:80]]
    result = fit(data["x"][:80], exact, tiny_config(epochs=3, warmup_epochs=1, reg_start_offset=0), tmp_path,
                 horizontal_flip=False, progress=False)
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_model_roundtrip_and_weights_only(reference_run: FitResult, data: dict[str, np.ndarray]) -> None:
    path = reference_run.model_path
    payload = torch.load(path, weights_only=True)
    assert payload["arch"]["backbone"] == "small_cnn" and payload["epoch"] == reference_run.best_epoch
    ckpt = torch.load(path.parent / "checkpoints" / "last.pt", weights_only=True)
    epochs = reference_config().epochs
    assert ckpt["next_epoch"] == epochs and len(ckpt["history"]) == epochs
    assert (path.parent / "history.json").exists()
    model = load_trained(path, "cpu")
    assert not model.training
    logits = predict_logits(model, data["x_test"][:10], batch_size=4)
    assert logits.shape == (10, K) and logits.dtype == np.float32
    x = model.normalize(torch.from_numpy(data["x_test"][:3]))
    with torch.no_grad():
        assert torch.allclose(model(x), model.net1(x) + model.net2(x))
        assert np.allclose(model(x).numpy(), logits[:3], atol=1e-5)


def test_load_trained_errors(tmp_path: Path) -> None:
    with pytest.raises(CoregError, match=r"missing\.pt"):
        load_trained(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CoregError, match=r"other\.pt"):
        load_trained(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CoregError, match=r"garbage\.pt"):
        load_trained(garbage)


def test_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(CoregError, match="uint8"):
        fit(np.zeros((4, 1, 8, 8), np.float32), np.ones((4, 2), np.float32), tiny_config(), tmp_path,
            horizontal_flip=False, progress=False)
    with pytest.raises(CoregError, match="candidates"):
        fit(np.zeros((4, 1, 8, 8), np.uint8), np.ones((3, 2), np.float32), tiny_config(), tmp_path,
            horizontal_flip=False, progress=False)


@pytest.mark.parametrize(("size", "channels"), [(32, 1), (64, 3)])
def test_preact_resnet18_shapes(size: int, channels: int) -> None:
    net, dim = build_backbone("preact_resnet18", channels, size)
    assert dim == 512
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, channels, size, size)).shape == (2, 512)
    # 64 px inputs: layer1 downsamples, so layer4 sees the same 4x4 maps as at 32 px
    assert net.layer1[0].conv1.stride == ((1, 1) if size == 32 else (2, 2))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_small_cnn_any_size(size: int) -> None:
    net, dim = build_backbone("small_cnn", 3, size)
    assert net(torch.zeros(2, 3, size, size)).shape == (2, dim)


def test_queue_valid_mask_and_wraparound() -> None:
    net = CoRegNet("small_cnn", 1, 8, num_classes=3, proj_hidden=8, proj_dim=4, queue_size=5)
    assert not net.queue_valid.any()  # an empty queue, not random noise
    keys = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    net.enqueue(keys, torch.eye(3), torch.tensor([True, False, True]))
    assert net.queue_valid.tolist() == [True, True, True, False, False]
    net.enqueue(keys, torch.eye(3), torch.tensor([False, False, False]))
    assert net.queue_valid.all() and int(net.queue_ptr) == 1
    assert net.queue_clean.tolist() == [False, False, True, False, False]
    net.reset_key_encoder()
    assert torch.equal(net.key_head[0].weight, net.head[0].weight)


def test_ensemble_forward_sums_logits() -> None:
    arch = {"backbone": "small_cnn", "in_channels": 1, "image_size": 8, "num_classes": 3, "proj_hidden": 8,
            "proj_dim": 4}
    model = CoRegEnsemble(arch).eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model(x), model.net1(x) + model.net2(x))


def test_clean_split_degenerate_and_history() -> None:
    w, clean = gmm_clean_weights(np.full(10, 0.3), 0.5, seed=0)
    assert clean.all() and np.allclose(w, 1.0)
    losses = np.r_[np.full(20, 0.05), np.full(10, 0.9)] + np.linspace(0, 0.01, 30)
    w, clean = gmm_clean_weights(losses, 0.5, seed=0)
    assert clean[:20].all() and not clean[20:].any()
    hist = LossHistory(2, 3)
    hist.update(torch.tensor([0.0, 1.0, 2.0]))
    hist.update(torch.tensor([5.0, 5.0, 5.0]))  # a flat epoch normalises to zeros
    out = hist.update(torch.tensor([2.0, 1.0, 0.0]))  # only the last 2 epochs count
    assert out.tolist() == pytest.approx([0.5, 0.25, 0.0])
