"""The batch-level view builder: per-sample reproducibility and the distribution of each op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coreg.train.augment import Augmenter, MultiViewDataset, channel_stats, make_loader, sample_uniforms

SIZE = 16


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (64, 3, SIZE, SIZE), dtype=np.uint8))


def make_augmenter(images: torch.Tensor, flip: bool = True) -> Augmenter:
    mean, std = channel_stats(images)
    return Augmenter(mean, std, SIZE, horizontal_flip=flip, magnitude=9)


def test_uniforms_depend_only_on_seed_and_sample() -> None:
    u = sample_uniforms(11, [5, 2, 9], 8)
    assert u.shape == (3, 8)
    assert np.array_equal(u[1], sample_uniforms(11, [2], 8)[0])
    assert np.array_equal(sample_uniforms(11, [9, 5], 8), u[[2, 0]])
    assert not np.array_equal(sample_uniforms(12, [5], 8)[0], u[0])
    big = sample_uniforms(3, np.arange(20_000), 4)
    assert big.min() >= 0.0 and big.max() < 1.0
    # Uniform and independent enough for augmentation: moments and correlations of 80k draws.
    assert abs(big.mean() - 0.5) < 0.01 and abs(big.var() - 1 / 12) < 0.005
    corr = np.corrcoef(big.T)
    assert np.abs(corr[~np.eye(4, dtype=bool)]).max() < 0.03
    neighbours = np.corrcoef(big[:-1, 0], big[1:, 0])[0, 1]  # consecutive samples
    assert abs(neighbours) < 0.03


@pytest.mark.parametrize("mode,count", [("train", 4), ("strong", 1), ("weak", 1)])
def test_views_of_a_sample_do_not_depend_on_its_batch(images: torch.Tensor, mode: str, count: int) -> None:
    ds = MultiViewDataset(images, make_augmenter(images), mode, stream_seed=42)
    batch = ds[[7, 3, 30, 12]]
    assert len(batch) == count + 1 and batch[-1].tolist() == [7, 3, 30, 12]
    alone = ds[[3]]
    other_batch = ds[list(range(0, 40))]
    single = ds[3]  # an integer index: unbatched views of that sample
    for v in range(count):
        assert batch[v].shape == (4, 3, SIZE, SIZE) and batch[v].dtype == torch.float32
        assert torch.equal(batch[v][1], alone[v][0])
        assert torch.equal(batch[v][1], other_batch[v][3])
        assert torch.equal(batch[v][1], single[v])
    if mode == "train":  # the two weak and the two strong views of one sample differ
        assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[2], batch[3])
    reseeded = MultiViewDataset(images, make_augmenter(images), mode, stream_seed=43)[[7, 3, 30, 12]]
    assert not torch.equal(reseeded[0], batch[0])


def test_crop_and_flip_are_shifted_windows_covering_every_offset(images: torch.Tensor) -> None:
    aug = make_augmenter(images)
    n = 2000
    batch = images[torch.arange(n) % images.shape[0]]
    u = sample_uniforms(5, np.arange(n), 8)
    out = aug.crop_flip(batch, u)
    p = aug.pad
    padded = F.pad(batch, (p, p, p, p))
    tops = np.floor(u[:, 0] * (2 * p + 1)).astype(int)
    lefts = np.floor(u[:, 1] * (2 * p + 1)).astype(int)
    flips = u[:, 2] < 0.5
    for i in range(0, n, 97):
        expected = padded[i, :, tops[i]:tops[i] + SIZE, lefts[i]:lefts[i] + SIZE]
        assert torch.equal(out[i], expected.flip(-1) if flips[i] else expected)
    assert set(tops) == set(range(2 * p + 1)) and set(lefts) == set(range(2 * p + 1))
    assert 0.45 < flips.mean() < 0.55
    no_flip = make_augmenter(images, flip=False).crop_flip(batch, u)
    for i in np.flatnonzero(flips)[:5]:
        assert torch.equal(no_flip[i], padded[i, :, tops[i]:tops[i] + SIZE, lefts[i]:lefts[i] + SIZE])


def test_batched_randaugment_equals_each_sample_alone(images: torch.Tensor) -> None:
    aug = make_augmenter(images)
    ra = aug.randaugment
    names = tuple(ra._AUGMENTATION_SPACE)
    n = 600
    batch = images[torch.arange(n) % images.shape[0]]
    u = sample_uniforms(9, np.arange(n), 8)
    out = aug.apply_randaugment(batch, u)
    ops = np.floor(u[:, 3] * len(names)).astype(int)
    counts = np.bincount(ops, minlength=len(names))
    assert counts.min() > 0.5 * n / len(names)  # every op is drawn, roughly uniformly
    changed = 0
    for i in range(0, n, 7):
        name = names[ops[i]]
        magnitudes_fn, signed = ra._AUGMENTATION_SPACE[name]
        magnitudes = magnitudes_fn(ra.num_magnitude_bins, SIZE, SIZE)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[ra.magnitude])
        if signed and u[i, 4] < 0.5:
            magnitude = -magnitude
        alone = ra._apply_image_or_video_transform(batch[i], name, magnitude, interpolation=ra.interpolation,
                                                   fill=ra._fill)
        assert torch.equal(out[i], alone), name
        changed += int(not torch.equal(out[i], batch[i]))
    assert changed > 0.5 * len(range(0, n, 7))


def test_cutout_zeroes_one_square_and_nothing_else() -> None:
    n = 500
    views = torch.ones(n, 2, SIZE, SIZE)
    u = sample_uniforms(1, np.arange(n), 8)
    out = Augmenter.cutout(views, u)
    assert torch.equal(out[:, 0], out[:, 1])  # the same square in every channel
    zero = out[:, 0] == 0
    sides = np.floor(1 + u[:, 5] * (SIZE // 2)).astype(int)
    for i in range(n):
        rows, cols = torch.nonzero(zero[i], as_tuple=True)
        assert len(rows) > 0
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert height * width == len(rows)  # a filled rectangle: the square clipped at the border
        assert height <= sides[i] and width <= sides[i]
    assert set(sides) == set(range(1, SIZE // 2 + 1))
    assert torch.equal(views, torch.ones(n, 2, SIZE, SIZE))  # the input is not modified


def test_loader_gives_the_same_batches_with_worker_processes(images: torch.Tensor) -> None:
    ds = MultiViewDataset(images, make_augmenter(images), "train", stream_seed=8)
    order = list(np.random.default_rng(0).permutation(images.shape[0]))
    in_process = list(make_loader(ds, order, 24, num_workers=0, seed=1))
    with_workers = list(make_loader(ds, order, 24, num_workers=2, seed=1))
    assert [b[4].shape[0] for b in in_process] == [24, 24, 16]
    for a, b in zip(in_process, with_workers, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
