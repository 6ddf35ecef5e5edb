"""Weak and strong views of uint8 images, reproducible per sample.

Every sample's randomness is seeded from ``(stream seed, sample index)``, not from the
order in which samples happen to be loaded: the same seed gives the same views with
``num_workers=0`` or with worker processes, and a resumed run sees the same views as an
uninterrupted one (the stream seed is derived from the run seed and the epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

ViewMode = Literal["train", "strong", "weak"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, stream, epoch, ...) via numpy's SeedSequence."""
    words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


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
    """Builds the weak and strong views of one uint8 (C, H, W) image from the global torch RNG.

    Callers seed that RNG per sample (see :class:`MultiViewDataset`). Crop, flip and Cutout
    are a few tensor ops (cheaper than generic transforms on tiny images); the strong view
    adds one torchvision ``v2.RandAugment`` op.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, image_size: int, horizontal_flip: bool,
                 magnitude: int) -> None:
        self.mean = mean.reshape(-1, 1, 1)
        self.std = std.reshape(-1, 1, 1)
        self.pad = max(1, image_size // 8)
        self.horizontal_flip = horizontal_flip
        self.randaugment = v2.RandAugment(num_ops=1, magnitude=magnitude)

    def _crop_flip(self, img: torch.Tensor) -> torch.Tensor:
        _, h, w = img.shape
        p = self.pad
        padded = F.pad(img, (p, p, p, p))  # zero padding, as the reference's RandomCrop(padding=4)
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        out = padded[:, top:top + h, left:left + w]
        if self.horizontal_flip and torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        return (img.to(torch.float32) / 255.0 - self.mean) / self.std

    @staticmethod
    def _cutout(img: torch.Tensor) -> torch.Tensor:
        """Zero (= the mean colour after normalising) a random square of side 1 .. width/2."""
        _, h, w = img.shape
        side = int(torch.randint(1, max(2, w // 2 + 1), ()).item())
        cy, cx = torch.randint(0, h, ()).item(), torch.randint(0, w, ()).item()
        y0, y1 = max(0, cy - side // 2), min(h, cy - side // 2 + side)
        x0, x1 = max(0, cx - side // 2), min(w, cx - side // 2 + side)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0.0
        return img

    def _randaugment(self, img: torch.Tensor) -> torch.Tensor:
        """One RandAugment op, drawn exactly as ``v2.RandAugment.forward`` draws it.

        The public ``forward`` spends ~10x the op's own cost on input flattening for a tiny
        image, so the op is applied through the transform's own op table when this torchvision
        (pinned 0.29) has it; otherwise the public call is used.
        """
        ra = self.randaugment
        space = getattr(ra, "_AUGMENTATION_SPACE", None)
        apply = getattr(ra, "_apply_image_or_video_transform", None)
        if not isinstance(space, dict) or apply is None:
            return ra(img)
        names = tuple(space)
        name = names[int(torch.randint(len(names), ()))]
        magnitudes_fn, signed = space[name]
        magnitudes = magnitudes_fn(ra.num_magnitude_bins, img.shape[-2], img.shape[-1])
        magnitude = 0.0
        if magnitudes is not None:
            magnitude = float(magnitudes[ra.magnitude])
            if signed and torch.rand(()) <= 0.5:
                magnitude *= -1
        return apply(img, name, magnitude, interpolation=ra.interpolation, fill=ra._fill)

    def weak(self, img: torch.Tensor) -> torch.Tensor:
        """Random crop with padding (+ optional flip), normalised."""
        return self._normalize(self._crop_flip(img))

    def strong(self, img: torch.Tensor) -> torch.Tensor:
        """Weak geometry + one RandAugment op + Cutout, normalised."""
        return self._cutout(self._normalize(self._randaugment(self._crop_flip(img))))


class MultiViewDataset(Dataset):
    """Views of ``images`` (uint8 (N, C, H, W)) keyed by the global sample index.

    mode ``train`` returns ``(w1, w2, s1, s2, index)``; ``strong`` returns ``(s, index)``
    (warm-up); ``weak`` returns ``(w, index)`` (the per-epoch prediction pass). The views of
    sample i depend only on ``(stream_seed, i)``.
    """

    def __init__(self, images: torch.Tensor, augmenter: Augmenter, mode: ViewMode, stream_seed: int) -> None:
        self.images = images
        self.augmenter = augmenter
        self.mode = mode
        self.stream_seed = stream_seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple:
        img = self.images[index]
        aug = self.augmenter
        cpu_rng = torch.default_generator
        saved = cpu_rng.get_state()  # leave the caller's RNG untouched
        # Seed the CPU generator directly: torch.manual_seed also walks the Python stack (about 1 ms).
        cpu_rng.manual_seed(derive_seed(self.stream_seed, index))
        try:
            if self.mode == "train":
                return aug.weak(img), aug.weak(img), aug.strong(img), aug.strong(img), index
            if self.mode == "strong":
                return aug.strong(img), index
            return aug.weak(img), index
        finally:
            cpu_rng.set_state(saved)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a worker (views do not need it) and keep each worker single-threaded."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, order: Sequence[int], batch_size: int, num_workers: int,
                seed: int) -> DataLoader:
    """A DataLoader visiting ``order`` (global indices) in batches; seeded so workers are reproducible."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=list(order), num_workers=num_workers,
                      generator=generator, worker_init_fn=_seed_worker if num_workers > 0 else None,
                      drop_last=False)
