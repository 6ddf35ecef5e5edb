"""Data sources, stable ids, seeded splits and the one-line errors of bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from coreg.config import DataConfig
from coreg.data import ANIMAL_NAMES, DIGIT_NAMES, ImageDataset, load_dataset, split_samples
from coreg.errors import CoregError


def _png(path: Path, value: int, size: int = 12, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, 255 - value, 7) if mode == "RGB" else value
    Image.new(mode, (size, size), color).save(path)
    return path


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _png(root / "cat" / "a.png", 10)
    _png(root / "cat" / "b.jpg", 20)
    _png(root / "dog" / "sub" / "c.png", 30, mode="L")
    _png(root / "dog" / "d.jpeg", 40)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_digits_ids_names_pixels() -> None:
    ds = load_dataset(DataConfig(source="digits"))
    assert len(ds) == 1797 and ds.sample_ids[17] == "digits-00017"
    assert ds.class_names == DIGIT_NAMES and ds.labels.dtype == np.int64
    assert ds.arrays is not None and ds.arrays.dtype == np.uint8 and ds.arrays.max() == 255
    x = ds.load_images([0, 1, 2], image_size=16, channels=3)
    assert x.shape == (3, 3, 16, 16) and x.dtype == np.uint8
    assert ds.load_image(0).size == (8, 8)


def test_limit_keeps_first_ids() -> None:
    ds = load_dataset(DataConfig(source="digits", limit=50))
    assert len(ds) == 50 and ds.sample_ids[-1] == "digits-00049"


def test_animal_mnist_with_limit() -> None:
    ds = load_dataset(DataConfig(source="animal_mnist", limit=30))
    assert len(ds) == 30 and ds.sample_ids[0] == "animal-00000"
    assert ds.class_names == ANIMAL_NAMES
    assert ds.load_images(range(2), 32, 1).shape == (2, 1, 32, 32)


def test_animal_mnist_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import coreg.data.sources as sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CoregError, match=re.escape("pip install --no-deps animal-mnist==0.4")):
        load_dataset(DataConfig(source="animal_mnist"))


def test_builtin_rename_must_match_count() -> None:
    ds = load_dataset(DataConfig(source="digits", class_names=[f"digit {n}" for n in DIGIT_NAMES], limit=3))
    assert ds.class_names[0] == "digit zero"
    with pytest.raises(CoregError, match=r"data\.class_names"):
        load_dataset(DataConfig(source="digits", class_names=["a", "b"]))


def test_folder_with_class_subfolders(class_folder: Path) -> None:
    ds = load_dataset(DataConfig(source="folder", path=str(class_folder)))
    assert ds.class_names == ["cat", "dog"]
    assert ds.sample_ids == ["cat/a.png", "cat/b.jpg", "dog/d.jpeg", "dog/sub/c.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    x = ds.load_images(range(4), image_size=8, channels=3)
    assert x.shape == (4, 3, 8, 8)
    assert x[3, 0, 0, 0] == 30  # grey PNG converted to RGB
    assert ds.load_images([0], 8, 1).shape == (1, 1, 8, 8)


def test_folder_ids_stable_across_loads(class_folder: Path) -> None:
    a = load_dataset(DataConfig(source="folder", path=str(class_folder)))
    b = load_dataset(DataConfig(source="folder", path=str(class_folder)))
    assert a.sample_ids == b.sample_ids and a.labels.tolist() == b.labels.tolist()


def test_folder_class_names_order_from_config(class_folder: Path) -> None:
    ds = load_dataset(DataConfig(source="folder", path=str(class_folder), class_names=["dog", "cat", "bird"]))
    assert ds.class_names == ["dog", "cat", "bird"] and ds.labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(CoregError, match=r"sub-folder 'dog' is not in data\.class_names"):
        load_dataset(DataConfig(source="folder", path=str(class_folder), class_names=["cat"]))


def test_flat_folder_needs_class_names(tmp_path: Path) -> None:
    _png(tmp_path / "x1.png", 1)
    _png(tmp_path / "x0.jpg", 2)
    with pytest.raises(CoregError, match=r"needs data\.class_names"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), class_names=["a", "b"]))
    assert ds.sample_ids == ["x0.jpg", "x1.png"] and ds.labels.tolist() == [-1, -1] and not ds.has_labels


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "image folder not found"),
        (lambda p: p, "image folder is empty"),
        (lambda p: (p / "a.txt").write_text("x") and p, "no images found"),
        (lambda p: (_png(p / "a" / "a.png", 1), _png(p / "b.png", 1)) and p, "loose images"),
        (lambda p: (p / "a").mkdir() or p, "no images found in the class sub-folders"),
    ],
    ids=["missing", "empty", "no-images", "loose-images", "empty-class-folder"],
)
def test_folder_errors(tmp_path: Path, setup, message: str) -> None:
    root = setup(tmp_path)
    with pytest.raises(CoregError, match=message) as err:
        load_dataset(DataConfig(source="folder", path=str(root), class_names=["a"]))
    assert "\n" not in str(err.value)


def test_flat_folder_bad_class_names(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 1)
    with pytest.raises(CoregError, match="appears twice"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), class_names=["a", "a"]))
    with pytest.raises(CoregError, match="empty"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), class_names=["a", " "]))
    with pytest.raises(CoregError, match="list is empty"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path), class_names=[]))


def _manifest_images(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "p0.png", 10)
    _png(tmp_path / "img" / "p1.jpg", 20)
    _png(tmp_path / "img" / "p2.png", 30)
    return tmp_path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    root = _manifest_images(tmp_path)
    df = pd.DataFrame(
        {
            "file": ["img/p2.png", "img/p0.png", str(root / "img" / "p1.jpg")],
            "key": ["s2", "s0", "s1"],
            "cls": ["dog", "cat", ""],
        }
    )
    path = root / f"m{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    cfg = DataConfig(source="manifest", path=str(path), path_column="file", id_column="key", label_column="cls")
    ds = load_dataset(cfg)
    assert ds.sample_ids == ["s0", "s1", "s2"]  # ordered by id
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, -1, 1]
    assert ds.load_images([2], 4, 1)[0, 0, 0, 0] == np.asarray(Image.open(root / "img" / "p2.png").convert("L"))[0, 0]


def test_manifest_default_id_is_path_and_class_names(tmp_path: Path) -> None:
    root = _manifest_images(tmp_path)
    pd.DataFrame({"path": ["img/p1.jpg", "img/p0.png"]}).to_csv(root / "m.csv", index=False)
    ds = load_dataset(DataConfig(source="manifest", path=str(root / "m.csv"), class_names=["x", "y"]))
    assert ds.sample_ids == ["img/p0.png", "img/p1.jpg"] and ds.labels.tolist() == [-1, -1]


def test_manifest_uri_accepted_but_not_loaded(tmp_path: Path) -> None:
    pd.DataFrame({"path": ["s3://bucket/a.jpg"]}).to_csv(tmp_path / "m.csv", index=False)
    ds = load_dataset(DataConfig(source="manifest", path=str(tmp_path / "m.csv"), class_names=["x"]))
    assert ds.paths == ["s3://bucket/a.jpg"]
    with pytest.raises(CoregError, match="not supported yet"):
        ds.load_image(0)


@pytest.mark.parametrize(
    ("frame", "extra", "message"),
    [
        ({"file": ["img/p0.png"]}, {}, r"column 'path' \(data.path_column\) not found"),
        ({"path": ["img/p0.png"]}, {"id_column": "key"}, r"column 'key' \(data.id_column\) not found"),
        ({"path": ["img/p0.png"]}, {"label_column": "y"}, r"column 'y' \(data.label_column\) not found"),
        ({"path": ["img/p0.png", "img/p1.jpg"], "key": ["a", "a"]}, {"id_column": "key"}, "row 1: duplicate"),
        ({"path": ["img/p0.png", "img/p0.png"]}, {}, "row 1: duplicate sample id 'img/p0.png'"),
        ({"path": ["img/p0.png", ""]}, {}, "row 1: column 'path' is empty"),
        ({"path": ["img/p0.png", "img/zz.png"]}, {}, "row 1: image file .*zz.png not found"),
        (
            {"path": ["img/p0.png"], "y": ["cow"]},
            {"label_column": "y", "class_names": ["cat"]},
            "row 0: label 'cow' is not in the class names",
        ),
        ({"path": ["img/p0.png"]}, {"class_names": None}, "needs data.class_names"),
    ],
)
def test_manifest_errors(tmp_path: Path, frame: dict, extra: dict, message: str) -> None:
    root = _manifest_images(tmp_path)
    pd.DataFrame(frame).to_csv(root / "m.csv", index=False)
    kwargs = {"class_names": ["cat", "dog"], **extra}
    with pytest.raises(CoregError, match=message) as err:
        load_dataset(DataConfig(source="manifest", path=str(root / "m.csv"), **kwargs))
    assert str(root / "m.csv") in str(err.value)


def test_manifest_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CoregError, match="manifest file not found"):
        load_dataset(DataConfig(source="manifest", path=str(tmp_path / "none.csv")))
    (tmp_path / "m.txt").write_text("path\n")
    with pytest.raises(CoregError, match=r"must be \.csv"):
        load_dataset(DataConfig(source="manifest", path=str(tmp_path / "m.txt")))
    (tmp_path / "m.csv").write_text("path\n")
    with pytest.raises(CoregError, match="no rows"):
        load_dataset(DataConfig(source="manifest", path=str(tmp_path / "m.csv")))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(CoregError, match="cannot read manifest"):
        load_dataset(DataConfig(source="manifest", path=str(tmp_path / "bad.parquet")))


def test_unreadable_image_is_a_coreg_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = ImageDataset(["x"], ["a"], np.array([-1]), paths=[str(tmp_path / "broken.png")])
    with pytest.raises(CoregError, match="sample 'x': cannot read image"):
        ds.load_image(0)


def test_split_seeded_and_stable() -> None:
    ids = [f"digits-{i:05d}" for i in range(200)]
    a = split_samples(ids, 0.2, seed=0)
    assert (a == "test").sum() == 40 and set(a) == {"train", "test"}
    assert np.array_equal(a, split_samples(ids, 0.2, seed=0))
    assert not np.array_equal(a, split_samples(ids, 0.2, seed=1))
    # The split of an id does not depend on the order the ids are listed in.
    rev = split_samples(ids[::-1], 0.2, seed=0)
    assert np.array_equal(rev[::-1], a)
    assert np.array_equal(split_samples(200, 0.2, 3), split_samples(200, 0.2, 3))


def test_split_small_sets() -> None:
    assert split_samples(["a", "b"], 0.01, 0).tolist().count("test") == 1
    assert split_samples(["a"], 0.5, 0).tolist() == ["train"]
    with pytest.raises(CoregError, match="unique"):
        split_samples(["a", "a"], 0.5, 0)


def test_animal_mnist_ids_interleave_classes() -> None:
    from coreg.data.sources import interleave_classes

    assert interleave_classes(np.array([0, 0, 0, 1, 1, 2])).tolist() == [0, 3, 5, 1, 4, 2]
    ds = load_dataset(DataConfig(source="animal_mnist", limit=20))
    assert ds.labels.tolist() == list(range(10)) * 2
