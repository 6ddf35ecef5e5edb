"""Build an :class:`ImageDataset` from a ``DataConfig``: built-in sets, folders, manifests.

Sample ids are stable across runs so splits, annotations and candidates can be joined by
id: ``digits-00017`` / ``animal-00017`` for the built-in sets (animal-mnist ids follow a
class-interleaved order, see :func:`interleave_classes`), the path relative to the
folder for folders, and the id column (or the path as written) for manifests. Every source
orders its samples by id, so ``data.limit`` keeps the first N ids whatever the source.

Digits classes are named with words ("zero" ... "nine"), not "0" ... "9", because the names
feed VLM prompts ("a photo of the digit {}") and a word reads better than a numeral there.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd

from coreg.config import DataConfig
from coreg.contracts import validate_class_names
from coreg.data.dataset import IMAGE_EXTENSIONS, ImageDataset, is_uri
from coreg.errors import CoregError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMAL_NAMES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
ANIMAL_DATA = "animal_data_version_3.gz"
ANIMAL_LABELS = "animal_label_version_3.gz"
ANIMAL_INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# Manifest paths must stay under the data root: the manifest's folder, or this folder when set
# (e.g. a shared volume that holds both the manifest and the images).
DATA_ROOT_ENV = "COREG_DATA_ROOT"


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the configured source, ordered by sample id, then keep the first ``cfg.limit``."""
    loaders = {
        "digits": _load_digits,
        "animal_mnist": _load_animal_mnist,
        "folder": _load_folder,
        "manifest": _load_manifest,
    }
    dataset = loaders[cfg.source](cfg)
    if len(dataset) == 0:
        raise CoregError(f"{dataset.source}: no samples found")
    if cfg.limit is not None and cfg.limit < len(dataset):
        dataset = dataset.subset(np.arange(cfg.limit))
    return dataset


# ----------------------------------------------------------------------------- built-in sets
def _builtin_names(cfg: DataConfig, default: list[str]) -> list[str]:
    """Built-in sets may be renamed (e.g. for prompts) but keep their number of classes."""
    if cfg.class_names is None:
        return list(default)
    validate_class_names(cfg.class_names, "data.class_names")
    if len(cfg.class_names) != len(default):
        raise CoregError(f"data.class_names: {cfg.source} has {len(default)} classes, got {len(cfg.class_names)} names")
    return list(cfg.class_names)


def _load_digits(cfg: DataConfig) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 values 0..16 -> 0..255 so every source has the same uint8 pixel range.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    ids = [f"digits-{i:05d}" for i in range(len(images))]
    return ImageDataset(
        ids, _builtin_names(cfg, DIGIT_NAMES), bunch.target.astype(np.int64), arrays=images, source="digits"
    )


def animal_mnist_files() -> tuple[Path, Path]:
    """Paths of the pickled images and labels inside the installed ``animal-mnist`` wheel.

    The package's own loader imports tensorflow, so the files are read directly instead.
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise CoregError(f"animal_mnist: package not installed; run `{ANIMAL_INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    data, labels = folder / ANIMAL_DATA, folder / ANIMAL_LABELS
    for path in (data, labels):
        if not path.is_file():
            raise CoregError(f"{path}: animal-mnist data file missing; reinstall with `{ANIMAL_INSTALL_HINT}`")
    return data, labels


def _read_pickle(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            return np.asarray(pickle.load(fh))
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise CoregError(f"{path}: cannot read animal-mnist data ({err}); run `{ANIMAL_INSTALL_HINT}`") from None


def _load_animal_mnist(cfg: DataConfig) -> ImageDataset:
    data_path, label_path = animal_mnist_files()
    images = _read_pickle(data_path).astype(np.uint8)
    labels = _read_pickle(label_path).astype(np.int64).reshape(-1)
    if images.ndim != 3 or len(images) != len(labels):
        raise CoregError(f"{data_path}: unexpected shape {images.shape} for {len(labels)} labels")
    order = interleave_classes(labels)
    ids = [f"animal-{i:05d}" for i in range(len(images))]
    return ImageDataset(
        ids, _builtin_names(cfg, ANIMAL_NAMES), labels[order], arrays=images[order], source="animal_mnist"
    )


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """Row order that cycles through the classes (1st of each class, then 2nd of each, ...).

    The animal-mnist file is sorted by class, so its first 100 rows are all bears; ids are
    given in this interleaved order instead so that ``data.limit`` keeps every class. It
    depends only on the file, so ids stay stable (``animal-00000`` is the first bear,
    ``animal-00001`` the first bird, ...).
    """
    labels = np.asarray(labels)
    by_class = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[by_class], labels[by_class], side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - starts
    return np.lexsort((np.arange(len(labels)), labels, rank))


# ----------------------------------------------------------------------------- folders
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not _hidden_part(p, folder))


def _hidden_part(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _load_folder(cfg: DataConfig) -> ImageDataset:
    """One sub-folder per class (labels known), or a flat folder plus ``data.class_names``.

    Symlinks are followed only while they stay inside the folder (or ``data.root`` /
    ``$COREG_DATA_ROOT`` when set): one leading elsewhere is an error naming the file.
    """
    root = Path(str(cfg.path)).expanduser()
    if not root.exists():
        raise CoregError(f"{root}: image folder not found (data.path)")
    if not root.is_dir():
        raise CoregError(f"{root}: data.path must be a folder when data.source is 'folder'")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise CoregError(f"{root}: image folder is empty")
    class_dirs = sorted(p for p in entries if p.is_dir())
    if class_dirs:
        return _load_class_folders(cfg, root, class_dirs, entries)
    return _load_flat_folder(cfg, root)


def folder_roots(root: Path, configured: str | None = None) -> list[Path]:
    """Where the images of a folder source may really live (symlinks followed): the folder itself,
    and ``data.root`` (else ``$COREG_DATA_ROOT``) when set."""
    configured = configured or os.environ.get(DATA_ROOT_ENV, "").strip()
    roots = [root.expanduser().resolve()]
    return [*roots, Path(configured).expanduser().resolve()] if configured else roots


def _resolve_inside(paths: list[Path], roots: list[Path]) -> list[str]:
    """The real paths of a folder's images; a symlink (to a file or a folder) leading out of the roots is refused."""
    resolved = []
    for path in paths:
        real = path.resolve()
        if not any(real.is_relative_to(r) for r in roots):
            raise CoregError(f"{path}: symlink leads outside the data root {roots[0]} "
                             f"(set data.root or {DATA_ROOT_ENV} to allow another folder)")
        resolved.append(str(real))
    return resolved


def _load_class_folders(cfg: DataConfig, root: Path, class_dirs: list[Path], entries: list[Path]) -> ImageDataset:
    loose = [p for p in entries if _is_image(p)]
    if loose:
        raise CoregError(
            f"{root}: has class sub-folders and loose images (e.g. {loose[0].name}); "
            "put every image in its class folder"
        )
    found = [d.name for d in class_dirs]
    if cfg.class_names is None:
        names = found
    else:
        validate_class_names(cfg.class_names, "data.class_names")
        names = list(cfg.class_names)
        unknown = [d for d in found if d not in names]
        if unknown:
            raise CoregError(f"{root / unknown[0]}: sub-folder {unknown[0]!r} is not in data.class_names")
    validate_class_names(names, str(root))
    index = {name: i for i, name in enumerate(names)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        files = _images_under(d)
        paths += files
        labels += [index[d.name]] * len(files)
    if not paths:
        raise CoregError(f"{root}: no images found in the class sub-folders (extensions: {_extensions()})")
    return _file_dataset(cfg, root, paths, names, np.asarray(labels, dtype=np.int64))


def _load_flat_folder(cfg: DataConfig, root: Path) -> ImageDataset:
    paths = _images_under(root)
    if not paths:
        raise CoregError(f"{root}: no images found (extensions: {_extensions()})")
    if cfg.class_names is None:
        raise CoregError(f"{root}: a flat image folder needs data.class_names (or one sub-folder per class)")
    validate_class_names(cfg.class_names, "data.class_names")
    return _file_dataset(cfg, root, paths, list(cfg.class_names), np.full(len(paths), -1, dtype=np.int64))


def _file_dataset(cfg: DataConfig, root: Path, paths: list[Path], names: list[str],
                  labels: np.ndarray) -> ImageDataset:
    real = _resolve_inside(paths, folder_roots(root, cfg.root))
    ids = [p.relative_to(root).as_posix() for p in paths]
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    return ImageDataset(
        sample_ids=[ids[i] for i in order],
        class_names=names,
        labels=labels[order],
        paths=[real[i] for i in order],
        source=str(root),
    )


def _extensions() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------- manifests
def _read_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CoregError(f"{path}: manifest file not found (data.path)")
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise CoregError(f"{path}: manifest must be .csv, .parquet or .pq, got {path.suffix or 'no suffix'!r}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False) if kind == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas/pyarrow raise many types for a bad file
        raise CoregError(f"{path}: cannot read manifest ({str(err).splitlines()[0] if str(err) else err})") from None
    if df.empty:
        raise CoregError(f"{path}: manifest has no rows")
    return df


def _text_column(df: pd.DataFrame, column: str, field: str, path: Path) -> np.ndarray:
    """A column as stripped strings, '' for missing cells, or an error naming the config field."""
    if column not in df.columns:
        columns = ", ".join(map(str, df.columns))
        raise CoregError(f"{path}: column {column!r} ({field}) not found; columns are {columns}")
    values = df[column]
    missing = values.isna().to_numpy()
    text = values.astype(str).str.strip().to_numpy(dtype=object)
    text[missing] = ""
    return text


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _load_manifest(cfg: DataConfig) -> ImageDataset:
    """Rows of (path, optional id, optional label name); relative paths are relative to the manifest."""
    path = Path(str(cfg.path)).expanduser()
    df = _read_manifest(path)
    raw_paths = _text_column(df, cfg.path_column, "data.path_column", path)
    empty = raw_paths == ""
    if empty.any():
        raise CoregError(f"{path}: row {_first(empty)}: column {cfg.path_column!r} is empty")
    ids = raw_paths if cfg.id_column is None else _text_column(df, cfg.id_column, "data.id_column", path)
    if cfg.id_column is not None and (ids == "").any():
        raise CoregError(f"{path}: row {_first(ids == '')}: column {cfg.id_column!r} (sample id) is empty")
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = _first(dup)
        raise CoregError(f"{path}: row {row}: duplicate sample id {ids[row]!r}")
    names, labels = _manifest_labels(cfg, df, path)
    root = data_root(path, cfg.root)
    resolved = [_resolve(p, path.parent) for p in raw_paths]
    for row, p in enumerate(resolved):
        if is_uri(p):
            continue
        if not Path(p).is_relative_to(root):
            raise CoregError(f"{path}: row {row}: path {raw_paths[row]!r} is outside the data root {root} "
                             f"(set data.root or {DATA_ROOT_ENV} to allow another folder)")
        if not Path(p).is_file():
            raise CoregError(f"{path}: row {row}: image file {p} not found")
    order = np.argsort(ids.astype(str), kind="stable")
    return ImageDataset(
        sample_ids=[str(ids[i]) for i in order],
        class_names=names,
        labels=labels[order],
        paths=[resolved[i] for i in order],
        source=str(path),
    )


def _manifest_labels(cfg: DataConfig, df: pd.DataFrame, path: Path) -> tuple[list[str], np.ndarray]:
    if cfg.label_column is None:
        if cfg.class_names is None:
            raise CoregError(f"{path}: a manifest without data.label_column needs data.class_names")
        validate_class_names(cfg.class_names, "data.class_names")
        return list(cfg.class_names), np.full(len(df), -1, dtype=np.int64)
    text = _text_column(df, cfg.label_column, "data.label_column", path)
    if cfg.class_names is not None:
        validate_class_names(cfg.class_names, "data.class_names")
        names = list(cfg.class_names)
    else:
        names = sorted({t for t in text if t})
        if not names:
            raise CoregError(f"{path}: column {cfg.label_column!r} has no labels; set data.class_names")
    index = {name: i for i, name in enumerate(names)}
    unknown = np.array([t != "" and t not in index for t in text])
    if unknown.any():
        row = _first(unknown)
        raise CoregError(f"{path}: row {row}: label {text[row]!r} is not in the class names")
    labels = np.array([index.get(t, -1) for t in text], dtype=np.int64)
    return names, labels


def data_root(manifest: Path, configured: str | None = None) -> Path:
    """The folder every manifest path must resolve into (symlinks followed): ``data.root``, else
    ``$COREG_DATA_ROOT``, else the manifest's own folder."""
    configured = configured or os.environ.get(DATA_ROOT_ENV, "").strip()
    return Path(configured or manifest.parent).expanduser().resolve()


def _resolve(raw: str, base: Path) -> str:
    """An absolute path with ``..`` and symlinks resolved (so the root check sees where it really points)."""
    if is_uri(raw):
        return raw
    p = Path(raw).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())
