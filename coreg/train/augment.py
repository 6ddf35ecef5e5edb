"""Weak and strong views of uint8 images, built a whole batch at a time, reproducible per sample.

Every random draw of sample i comes from a counter-based generator keyed by ``(stream seed,
i)`` (:func:`sample_uniforms`), not from the order in which samples happen to be loaded: the
same seed gives the same views whatever the batch composition, with ``num_workers=0`` or with
worker processes, on any rank, and a resumed run sees the same views as an uninterrupted one
(the stream seed is derived from the run seed and the epoch).

Why batch-level: building views one sample at a time costs a few dozen small tensor ops and
Python calls per image, which on a small backbone took a quarter of the epoch. Here crop, flip,
cutout and normalisation are a few vectorised ops per batch, and RandAugment is one batched
torchvision call per (op, sign) group present in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torchvision.transforms import v2

ViewMode = Literal["train", "strong", "weak"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_DRAWS_PER_VIEW = 8  # crop top, crop left, flip, RandAugment op, sign, cutout side, centre y, centre x
_VIEWS_PER_MODE = {"train": ("weak", "weak", "strong", "strong"), "strong": ("strong",), "weak": ("weak",)}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, stream, epoch, ...) via numpy's SeedSequence."""
    words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(stream_seed: int, indices: Sequence[int] | np.ndarray, draws: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape (len(indices), draws); row r depends only on (stream_seed, indices[r]).

    A counter-based generator (splitmix64 of seed, sample index and draw number): seeding a
    stateful generator per sample costs more than the augmentation itself on small images.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    key = _splitmix64(np.array([stream_seed % 2**64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        per_sample = _splitmix64(key ^ _splitmix64(idx))
        bits = _splitmix64(per_sample + np.arange(draws, dtype=np.uint64).reshape(1, -1) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _randint(u: np.ndarray, low: int, high: int) -> torch.Tensor:
    """Integers uniform in [low, high) from uniforms ``u``."""
    return torch.from_numpy(np.minimum(low + np.floor(u * (high - low)), high - 1).astype(np.int64))


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (0-1 scale, shape (1, C, 1, 1)) of a uint8 (N, C, H, W) tensor."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
    std = x.std(dim=(0, 2, 3)).reshape(1, -1, 1, 1).clamp_min(1e-3)  # a constant channel must not divide by 0
    return mean.float(), std.float()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The plain (prediction) view: uint8 -> float standardised with the training statistics."""
    return (images.to(torch.float32) / 255.0 - mean.to(images.device)) / std.to(images.device)


class Augmenter:
    """Builds weak and strong views of a uint8 (N, C, H, W) batch from per-sample uniforms.

    weak: random crop with zero padding (as the reference's ``RandomCrop(padding=4)`` at 32 px)
    and an optional horizontal flip. strong: the weak geometry, one torchvision
    ``v2.RandAugment`` op (drawn as ``RandAugment.forward`` draws it: op uniform over its
    space, sign of a signed magnitude 50/50) and Cutout of a random square.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, image_size: int, horizontal_flip: bool,
                 magnitude: int) -> None:
        self.mean = mean.reshape(1, -1, 1, 1)
        self.std = std.reshape(1, -1, 1, 1)
        self.pad = max(1, image_size // 8)
        self.horizontal_flip = horizontal_flip
        self.randaugment = v2.RandAugment(num_ops=1, magnitude=magnitude)

    def crop_flip(self, images: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """Per-sample crop offsets (u[:, 0], u[:, 1]) and flips (u[:, 2]) as one gather."""
        n, c, h, w = images.shape
        p = self.pad
        padded = F.pad(images, (p, p, p, p))
        rows = _randint(u[:, 0], 0, 2 * p + 1).reshape(n, 1, 1, 1) + torch.arange(h).reshape(1, 1, h, 1)
        cols = _randint(u[:, 1], 0, 2 * p + 1).reshape(n, 1, 1, 1) + torch.arange(w).reshape(1, 1, 1, w)
        if self.horizontal_flip:
            flip = torch.from_numpy(u[:, 2] < 0.5).reshape(n, 1, 1, 1)
            cols = torch.where(flip, cols.flip(-1), cols)
        return padded[torch.arange(n).reshape(n, 1, 1, 1), torch.arange(c).reshape(1, c, 1, 1), rows, cols]

    def apply_randaugment(self, images: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """One RandAugment op per sample (op from u[:, 3], sign from u[:, 4]), one call per (op, sign) group.

        The op table is torchvision's own (``_AUGMENTATION_SPACE``, pinned torchvision 0.29);
        without it each sample goes through the public ``forward`` (same distribution, not seeded).
        """
        ra = self.randaugment
        space = getattr(ra, "_AUGMENTATION_SPACE", None)
        apply = getattr(ra, "_apply_image_or_video_transform", None)
        if not isinstance(space, dict) or apply is None:
            return torch.stack([ra(img) for img in images])
        names = tuple(space)
        op = _randint(u[:, 3], 0, len(names)).numpy()
        negative = u[:, 4] < 0.5
        out = torch.empty_like(images)  # every row belongs to exactly one (op, sign) group below
        h, w = images.shape[-2:]
        for op_id in np.unique(op):
            name = names[op_id]
            magnitudes_fn, signed = space[name]
            magnitudes = magnitudes_fn(ra.num_magnitude_bins, h, w)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[ra.magnitude])
            this_op = op == op_id
            groups = [(this_op & negative, -magnitude), (this_op & ~negative, magnitude)] if signed \
                else [(this_op, magnitude)]
            for rows, signed_magnitude in groups:
                if rows.any():
                    sel = torch.from_numpy(np.flatnonzero(rows))
                    out[sel] = apply(images[sel], name, signed_magnitude, interpolation=ra.interpolation,
                                     fill=ra._fill)
        return out

    @staticmethod
    def cutout(views: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """Zero (= the mean colour after normalising) a square of side 1 .. width/2 centred at a random pixel."""
        n, _, h, w = views.shape
        side = _randint(u[:, 5], 1, max(2, w // 2 + 1))
        cy, cx = _randint(u[:, 6], 0, h), _randint(u[:, 7], 0, w)
        y0, x0 = (cy - side // 2).clamp_min(0), (cx - side // 2).clamp_min(0)
        y1, x1 = (cy - side // 2 + side).clamp_max(h), (cx - side // 2 + side).clamp_max(w)
        ys, xs = torch.arange(h).reshape(1, h, 1), torch.arange(w).reshape(1, 1, w)
        inside = ((ys >= y0.reshape(n, 1, 1)) & (ys < y1.reshape(n, 1, 1))
                  & (xs >= x0.reshape(n, 1, 1)) & (xs < x1.reshape(n, 1, 1)))
        return views.masked_fill(inside.unsqueeze(1), 0.0)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) / 255.0 - self.mean) / self.std

    def weak(self, images: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """Random crop with padding (+ optional flip), normalised."""
        return self._normalize(self.crop_flip(images, u))

    def strong(self, images: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """Weak geometry + one RandAugment op + Cutout, normalised."""
        return self.cutout(self._normalize(self.apply_randaugment(self.crop_flip(images, u), u)), u)


class MultiViewDataset(Dataset):
    """Views of ``images`` (uint8 (N, C, H, W)) keyed by the global sample index, fetched a batch at a time.

    ``dataset[list_of_indices]`` returns batched tensors: mode ``train`` gives
    ``(w1, w2, s1, s2, index)``; ``strong`` gives ``(s, index)`` (warm-up); ``weak`` gives
    ``(w, index)`` (the per-epoch prediction pass). The views of sample i depend only on
    ``(stream_seed, i)``. An integer index gives the same views of that one sample, unbatched.
    """

    def __init__(self, images: torch.Tensor, augmenter: Augmenter, mode: ViewMode, stream_seed: int) -> None:
        self.images = images
        self.augmenter = augmenter
        self.mode = mode
        self.stream_seed = stream_seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def views(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The mode's views of ``indices`` as batched tensors, followed by the indices (int64)."""
        kinds = _VIEWS_PER_MODE[self.mode]
        u = sample_uniforms(self.stream_seed, indices, _DRAWS_PER_VIEW * len(kinds))
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        batch = self.images[index]
        built = []
        for v, kind in enumerate(kinds):
            draws = u[:, v * _DRAWS_PER_VIEW:(v + 1) * _DRAWS_PER_VIEW]
            built.append(self.augmenter.weak(batch, draws) if kind == "weak" else self.augmenter.strong(batch, draws))
        return (*built, index)

    def __getitem__(self, index: int | Sequence[int]) -> tuple:
        if isinstance(index, (int, np.integer)):
            *single, _ = self.views([int(index)])
            return (*(v[0] for v in single), int(index))
        return self.views(index)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a worker (views do not need it) and keep each worker single-threaded."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, order: Sequence[int], batch_size: int, num_workers: int,
                seed: int, pin_memory: bool = False) -> DataLoader:
    """Batches of ``dataset`` over ``order`` (global indices), each built by one ``dataset[batch]`` call.

    Seeded so workers are reproducible; ``pin_memory`` (for CUDA) lets the host-to-device copy
    run asynchronously (``.to(device, non_blocking=True)``).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    batches = BatchSampler(list(order), batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_size=None, sampler=batches, num_workers=num_workers, generator=generator,
                      worker_init_fn=_seed_worker if num_workers > 0 else None, pin_memory=pin_memory)
