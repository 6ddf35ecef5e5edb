"""Image data sources, the in-memory data set and the seeded train/test split."""

from coreg.data.dataset import IMAGE_EXTENSIONS, ImageDataset
from coreg.data.sources import ANIMAL_NAMES, DIGIT_NAMES, animal_mnist_files, load_dataset
from coreg.data.splits import split_samples

__all__ = [
    "ANIMAL_NAMES",
    "DIGIT_NAMES",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "animal_mnist_files",
    "load_dataset",
    "split_samples",
]
