"""The in-memory view of an image data set that every stage works from.

A data set is a list of stable sample ids, the class names, ground-truth labels (``-1``
when unknown) and a way to get pixels. Built-in sources keep their small arrays in memory;
file sources keep only paths and open images on demand, so a folder of a million JPEGs
costs a list of strings until pixels are actually needed.

Ground-truth labels are never used to train the student: they feed evaluation and the
annotation simulation's teacher (which sees train-split labels only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from coreg.errors import CoregError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
URI_MARK = "://"


def is_uri(path: str) -> bool:
    """True for remote locations such as ``s3://bucket/x.jpg`` (kept as strings, not loaded yet)."""
    return URI_MARK in path


@dataclass
class ImageDataset:
    """Sample ids, class names, labels and pixels (in memory or behind file paths).

    Exactly one of ``arrays`` (uint8, ``(n, H, W)`` grey or ``(n, H, W, 3)`` RGB) and
    ``paths`` (absolute local paths or URIs) is set.
    """

    sample_ids: list[str]
    class_names: list[str]
    labels: np.ndarray
    arrays: np.ndarray | None = None
    paths: list[str] | None = None
    source: str = field(default="dataset")

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.sample_ids)
        if (self.arrays is None) == (self.paths is None):
            raise ValueError("ImageDataset needs exactly one of arrays and paths")
        size = len(self.arrays) if self.arrays is not None else len(self.paths or [])
        if size != n or self.labels.shape != (n,):
            raise ValueError(f"ImageDataset: {n} ids, {size} images and {self.labels.shape} labels do not match")
        bad = (self.labels < -1) | (self.labels >= len(self.class_names))
        if bad.any():
            raise ValueError(f"ImageDataset: label {self.labels[bad][0]} is outside [-1, {len(self.class_names)})")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        """Whether any ground truth is known (needed by evaluation and the simulation)."""
        return bool((self.labels >= 0).any())

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A new data set with the given samples, in the given order (used by ``limit``)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            sample_ids=[self.sample_ids[i] for i in idx],
            class_names=list(self.class_names),
            labels=self.labels[idx].copy(),
            arrays=None if self.arrays is None else self.arrays[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            source=self.source,
        )

    def load_image(self, i: int) -> Image.Image:
        """Sample ``i`` as a PIL image in its stored mode (file sources open the file now)."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        assert self.paths is not None
        return _open_image(self.paths[i], self.sample_ids[i])

    def load_images(self, indices: Sequence[int] | np.ndarray, image_size: int, channels: int) -> np.ndarray:
        """Samples as a uint8 array ``(n, C, H, W)``, resized to ``image_size`` squared.

        Resizing uses PIL bilinear filtering, which also antialiases when shrinking.
        """
        if channels not in (1, 3):
            raise CoregError(f"channels must be 1 or 3, got {channels}")
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), channels, image_size, image_size), dtype=np.uint8)
        mode = "L" if channels == 1 else "RGB"
        for row, i in enumerate(idx):
            out[row] = _to_chw(self.load_image(int(i)), image_size, mode)
        return out


def _to_chw(img: Image.Image, image_size: int, mode: str) -> np.ndarray:
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _open_image(path: str, sample_id: str) -> Image.Image:
    if is_uri(path):
        raise CoregError(
            f"{path}: sample {sample_id!r}: loading images from URIs is not supported yet; "
            "copy the files locally and list local paths"
        )
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode in ("L", "RGB") else img.convert("RGB")
    except FileNotFoundError:
        raise CoregError(f"{path}: sample {sample_id!r}: image file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CoregError(f"{path}: sample {sample_id!r}: cannot read image ({reason})") from None
