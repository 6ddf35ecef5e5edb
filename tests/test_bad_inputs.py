"""Bad input through the real CLI: exit 2, one stderr line naming the file/row/field, no output left.

One table row per bad input of docs/errors.md. Each case builds its input under ``tmp_path``,
runs ``coreg <stage>`` with ``--quiet`` and checks what a user sees. Cases already covered by
the unit tests (tests/test_data.py, test_contracts.py, test_imports.py, test_config.py) are here
once more end to end, through ``coreg.cli.main``, because that is what an unattended run shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from coreg.cli import main
from coreg.contracts import write_candidates

QUIET = ["--quiet", "--set", "annotate.num_annotators=3", "--set", "train.device=cpu"]


def _png(path: Path, value: int = 128, size: int = 8, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((size, size + 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = value, 255 - value, (value * 7) % 256
    Image.fromarray(rgb, mode="RGB").convert(mode).save(path)
    return path


def _class_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog"]):
        for i in range(per_class):
            _png(root / name / f"{i:02d}.png", int(rng.integers(0, 255)) if c else 20 + i)
    return root


def _folder_args(root: Path, *extra: str) -> list[str]:
    args = ["--set", "data.source=folder", "--set", f"data.path={root}", "--set", "data.test_fraction=0.3"]
    for item in extra:
        args += ["--set", item]
    return args


def _manifest(tmp: Path, frame: dict, suffix: str = ".csv") -> Path:
    path = tmp / f"manifest{suffix}"
    df = pd.DataFrame(frame)
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path, index=False)
    return path


def _manifest_args(path: Path, *extra: str) -> list[str]:
    args = ["--set", "data.source=manifest", "--set", f"data.path={path}", "--set", "data.class_names=[cat, dog]"]
    for item in extra:
        args += ["--set", item]
    return args


# --------------------------------------------------------------------------- builders (tmp -> argv, needle)
Case = Callable[[Path], tuple[list[str], str]]


def missing_folder(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", *_folder_args(tmp / "nope")], "image folder not found"


def empty_folder(tmp: Path) -> tuple[list[str], str]:
    (tmp / "imgs").mkdir()
    return ["annotate", *_folder_args(tmp / "imgs")], "image folder is empty"


def only_non_images(tmp: Path) -> tuple[list[str], str]:
    (tmp / "imgs").mkdir()
    (tmp / "imgs" / "notes.txt").write_text("hello")
    return ["annotate", *_folder_args(tmp / "imgs", "data.class_names=[a, b]")], "no images found"


def class_folders_without_images(tmp: Path) -> tuple[list[str], str]:
    (tmp / "imgs" / "cat").mkdir(parents=True)
    (tmp / "imgs" / "dog").mkdir()
    (tmp / "imgs" / "dog" / "readme.md").write_text("x")
    return ["annotate", *_folder_args(tmp / "imgs")], "no images found in the class sub-folders"


def _bad_image(tmp: Path, content: bytes) -> tuple[list[str], str]:
    root = _class_folder(tmp / "imgs")
    (root / "dog" / "03.png").write_bytes(content)
    return ["annotate", *_folder_args(root)], "dog/03.png"


def corrupt_image(tmp: Path) -> tuple[list[str], str]:
    return _bad_image(tmp, b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def zero_byte_image(tmp: Path) -> tuple[list[str], str]:
    return _bad_image(tmp, b"")


def truncated_image(tmp: Path) -> tuple[list[str], str]:
    full = _png(tmp / "full.png", 7, size=64)
    return _bad_image(tmp, full.read_bytes()[: len(full.read_bytes()) // 2])


def text_named_png(tmp: Path) -> tuple[list[str], str]:
    return _bad_image(tmp, b"this is not an image\n")


def manifest_missing_path_column(tmp: Path) -> tuple[list[str], str]:
    path = _manifest(tmp, {"file": ["a.png"]})
    return ["annotate", *_manifest_args(path)], "column 'path' (data.path_column) not found"


def manifest_missing_id_column(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    path = _manifest(tmp, {"path": ["a.png"]})
    return ["annotate", *_manifest_args(path, "data.id_column=sid")], "column 'sid' (data.id_column) not found"


def manifest_missing_label_column(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    path = _manifest(tmp, {"path": ["a.png"]})
    return ["annotate", *_manifest_args(path, "data.label_column=y")], "column 'y' (data.label_column) not found"


def manifest_duplicate_ids(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    _png(tmp / "b.png")
    path = _manifest(tmp, {"path": ["a.png", "b.png"], "id": ["x", "x"]})
    return ["annotate", *_manifest_args(path, "data.id_column=id")], "row 1: duplicate sample id 'x'"


def manifest_missing_file(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    path = _manifest(tmp, {"path": ["a.png", "gone.png"]})
    return ["annotate", *_manifest_args(path)], "row 1: image file"


def manifest_empty_path_cell(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    path = _manifest(tmp, {"path": ["a.png", ""]})
    return ["annotate", *_manifest_args(path)], "row 1: column 'path' is empty"


def manifest_unknown_label(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "a.png")
    path = _manifest(tmp, {"path": ["a.png"], "y": ["horse"]})
    return ["annotate", *_manifest_args(path, "data.label_column=y")], "row 0: label 'horse'"


def manifest_no_rows(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "manifest.csv"
    path.write_text("path\n")
    return ["annotate", *_manifest_args(path)], "manifest has no rows"


def manifest_not_a_table(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "manifest.parquet"
    path.write_bytes(b"not parquet")
    return ["annotate", *_manifest_args(path)], "cannot read manifest"


def manifest_wrong_suffix(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "manifest.xlsx"
    path.write_text("x")
    return ["annotate", *_manifest_args(path)], "manifest must be .csv, .parquet or .pq"


def manifest_path_escapes_with_dotdot(tmp: Path) -> tuple[list[str], str]:
    (tmp / "data").mkdir()
    _png(tmp / "secret.png")
    path = _manifest(tmp / "data", {"path": ["../secret.png"]})
    return ["annotate", *_manifest_args(path)], "row 0: path '../secret.png' is outside the data root"


def manifest_absolute_path_outside_root(tmp: Path) -> tuple[list[str], str]:
    (tmp / "data").mkdir()
    outside = _png(tmp / "secret.png")
    path = _manifest(tmp / "data", {"path": [str(outside)]})
    return ["annotate", *_manifest_args(path)], "is outside the data root"


def manifest_symlink_escape(tmp: Path) -> tuple[list[str], str]:
    (tmp / "data").mkdir()
    outside = _png(tmp / "secret.png")
    (tmp / "data" / "link.png").symlink_to(outside)
    path = _manifest(tmp / "data", {"path": ["link.png"]})
    return ["annotate", *_manifest_args(path)], "is outside the data root"


def folder_symlink_escape(tmp: Path) -> tuple[list[str], str]:
    outside = _png(tmp / "secret.png")
    root = _class_folder(tmp / "imgs")
    (root / "dog" / "link.png").symlink_to(outside)
    return ["annotate", *_folder_args(root)], f"{root}/dog/link.png: symlink leads outside the data root"


def empty_class_name(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "data.class_names=[zero, '', two, three, four, five, six, seven, eight, nine]"], \
        "class name #1 is empty"


def duplicate_class_name(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "data.class_names=[a, b, c, d, e, f, g, h, i, a]"], "class name 'a' appears twice"


def flat_folder_duplicate_class_names(tmp: Path) -> tuple[list[str], str]:
    _png(tmp / "imgs" / "a.png")
    return ["annotate", *_folder_args(tmp / "imgs", "data.class_names=[x, x]")], "class name 'x' appears twice"


def config_wrong_type(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "train.epochs=many"], "'train.epochs'"


def config_out_of_range(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "data.test_fraction=1.5"], "'data.test_fraction'"


def config_unknown_key(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "train.learning_rate=0.1"], "'train.learning_rate': unknown key"


def config_unknown_section(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--set", "trian.epochs=3"], "'trian': unknown key"


def config_file_not_yaml(tmp: Path) -> tuple[list[str], str]:
    cfg = tmp / "bad.yaml"
    cfg.write_text("data: [unclosed\n")
    return ["annotate", "--config", str(cfg)], "not valid YAML"


def config_file_missing(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--config", str(tmp / "none.yaml")], "config file not found"


def config_not_a_mapping(tmp: Path) -> tuple[list[str], str]:
    cfg = tmp / "list.yaml"
    cfg.write_text("- 1\n- 2\n")
    return ["annotate", "--config", str(cfg)], "config must be a mapping"


def _import(tmp: Path, lines: list[dict]) -> tuple[list[str], Path]:
    path = tmp / "vlm.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return ["annotate", "--set", "data.limit=40", "--import", str(path)], path


def import_nan_score(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "digits-00000", "answer": "zero", "score": "NaN"}])
    return args, "row 0: score nan is outside [0, 1]"


def import_negative_score(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "digits-00000", "answer": "zero", "score": -0.5}])
    return args, "row 0: score -0.5 is outside [0, 1]"


def import_non_numeric_score(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "digits-00000", "answer": "zero", "score": "high"}])
    return args, "row 0: score 'high' is not a number"


def import_only_unknown_ids(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "cifar-1", "answer": "zero"}])
    return args, "names a sample of the data set"


def import_only_unknown_classes(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "digits-00000", "answer": "a giraffe"}])
    return args, "none of its answers matches a class name"


def import_bad_json(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "vlm.jsonl"
    path.write_text('{"sample_id": "digits-00000", "answer": "zero"}\n{"sample_id": \n')
    return ["annotate", "--set", "data.limit=40", "--import", str(path)], "line 2: not valid JSON"


def import_no_answer_column(tmp: Path) -> tuple[list[str], str]:
    args, _ = _import(tmp, [{"sample_id": "digits-00000", "guess": "zero"}])
    return args, "needs an 'answer' or 'label' column"


def import_missing_file(tmp: Path) -> tuple[list[str], str]:
    return ["annotate", "--import", str(tmp / "none.jsonl")], "file not found"


def _annotate_folder(tmp: Path) -> Path:
    """A tiny valid digits annotate folder (shared by the aggregate/train cases)."""
    out = tmp / "run"
    assert main([*QUIET_STAGE("annotate", out)]) == 0
    return out


def QUIET_STAGE(stage: str, out: Path, *extra: str) -> list[str]:
    args = [stage, *QUIET, "--set", f"output_dir={out}", "--set", "data.limit=60"]
    for item in extra:
        args += ["--set", item]
    return args


def annotations_unknown_class(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    df = pd.read_parquet(out / "annotate" / "annotations.parquet")
    df.loc[3, "label"] = 42
    df.to_parquet(out / "annotate" / "annotations.parquet", index=False)
    return QUIET_STAGE("aggregate", out), "annotations.parquet: row 3: label 42 is not a class index"


def annotations_nan_probs(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    df = pd.read_parquet(out / "annotate" / "annotations.parquet")
    probs = list(df["probs"])
    probs[2] = np.full(10, np.nan, dtype=np.float32)
    df["probs"] = probs
    df.to_parquet(out / "annotate" / "annotations.parquet", index=False)
    return QUIET_STAGE("aggregate", out), "row 2: probs must be finite and non-negative"


def annotations_negative_probability(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    df = pd.read_parquet(out / "annotate" / "annotations.parquet")
    df["probability"] = df["probability"].astype("float32")
    df.loc[5, "probability"] = -0.25
    df.to_parquet(out / "annotate" / "annotations.parquet", index=False)
    return QUIET_STAGE("aggregate", out), "row 5: probability -0.25 is outside [0, 1]"


def annotations_unknown_id(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    df = pd.read_parquet(out / "annotate" / "annotations.parquet")
    df.loc[0, "sample_id"] = "not-a-sample"
    df.to_parquet(out / "annotate" / "annotations.parquet", index=False)
    return QUIET_STAGE("aggregate", out), "not-a-sample"


def annotations_missing_column(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    df = pd.read_parquet(out / "annotate" / "annotations.parquet")
    df.drop(columns="annotator").to_parquet(out / "annotate" / "annotations.parquet", index=False)
    return QUIET_STAGE("aggregate", out), "missing column(s) annotator"


def annotations_truncated_file(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    path = out / "annotate" / "annotations.parquet"
    path.write_bytes(path.read_bytes()[:100])
    return QUIET_STAGE("aggregate", out), "annotations.parquet: not a readable Parquet file"


def classes_json_duplicated(tmp: Path) -> tuple[list[str], str]:
    out = _annotate_folder(tmp)
    (out / "annotate" / "classes.json").write_text(json.dumps({"class_names": ["a"] * 10}))
    return QUIET_STAGE("aggregate", out), "classes.json: class name 'a' appears twice"


def _aggregate_folder(tmp: Path) -> Path:
    out = _annotate_folder(tmp)
    assert main(QUIET_STAGE("aggregate", out)) == 0
    return out


def empty_candidate_set(tmp: Path) -> tuple[list[str], str]:
    out = _aggregate_folder(tmp)
    df = pd.read_parquet(out / "aggregate" / "candidates.parquet")
    df.at[4, "candidates"] = []
    write_candidates(out / "aggregate", df)
    return QUIET_STAGE("train", out), "candidates.parquet: row 4"


def annotations_of_another_data_set(tmp: Path) -> tuple[list[str], str]:
    out = _aggregate_folder(tmp)
    return QUIET_STAGE("train", out, "data.source=folder", f"data.path={_class_folder(tmp / 'imgs')}",
                       "data.limit=12"), "different data set"


def annotations_of_a_renamed_data_set(tmp: Path) -> tuple[list[str], str]:
    out = _aggregate_folder(tmp)
    names = "[a, b, c, d, e, f, g, h, i, j]"
    return QUIET_STAGE("train", out, f"data.class_names={names}"), "different data set"


def missing_previous_stage(tmp: Path) -> tuple[list[str], str]:
    return QUIET_STAGE("train", tmp / "run"), "aggregate/classes.json: file not found"


CASES: dict[str, Case] = {f.__name__: f for f in [
    missing_folder, empty_folder, only_non_images, class_folders_without_images,
    corrupt_image, zero_byte_image, truncated_image, text_named_png,
    manifest_missing_path_column, manifest_missing_id_column, manifest_missing_label_column,
    manifest_duplicate_ids, manifest_missing_file, manifest_empty_path_cell, manifest_unknown_label,
    manifest_no_rows, manifest_not_a_table, manifest_wrong_suffix,
    manifest_path_escapes_with_dotdot, manifest_absolute_path_outside_root, manifest_symlink_escape,
    folder_symlink_escape,
    empty_class_name, duplicate_class_name, flat_folder_duplicate_class_names,
    config_wrong_type, config_out_of_range, config_unknown_key, config_unknown_section,
    config_file_not_yaml, config_file_missing, config_not_a_mapping,
    import_nan_score, import_negative_score, import_non_numeric_score, import_only_unknown_ids,
    import_only_unknown_classes, import_bad_json, import_no_answer_column, import_missing_file,
    annotations_unknown_class, annotations_nan_probs, annotations_negative_probability, annotations_unknown_id,
    annotations_missing_column, annotations_truncated_file, classes_json_duplicated,
    empty_candidate_set, annotations_of_another_data_set, annotations_of_a_renamed_data_set,
    missing_previous_stage,
]}


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default output_dir (runs/digits) would land here
    argv, needle = CASES[name](tmp_path)
    if "output_dir=" not in " ".join(argv):
        argv = [argv[0], *QUIET, "--set", f"output_dir={tmp_path / 'out'}", *argv[1:]]
    capsys.readouterr()
    before = _listing(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"coreg {argv[0]}: error: ") and needle in err[0], err[0]
    # Nothing new: no stage folder, no staging/temporary file (the default output_dir included).
    created = _listing(tmp_path) - before
    assert not created, sorted(created)


def test_mixed_image_modes_and_sizes_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Grey, RGB, RGBA, palette, 1-bit and 16-bit images of different sizes load and annotate."""
    root = tmp_path / "imgs"
    modes = ["L", "RGB", "RGBA", "P", "1", "I;16", "LA", "CMYK"]
    for c, name in enumerate(["cat", "dog"]):
        for i, mode in enumerate(modes):
            _png(root / name / f"{i:02d}.{'jpg' if mode == 'CMYK' else 'png'}", 30 + 100 * c + i,
                 size=5 + 7 * i, mode=mode)
    from coreg.config import DataConfig
    from coreg.data import load_dataset

    ds = load_dataset(DataConfig(source="folder", path=str(root)))
    for channels in (1, 3):
        arr = ds.load_images(np.arange(len(ds)), 12, channels)
        assert arr.shape == (len(ds), channels, 12, 12) and arr.dtype == np.uint8
    assert main(["annotate", *QUIET, "--set", f"output_dir={tmp_path / 'out'}", *_folder_args(root)]) == 0
    assert (tmp_path / "out" / "annotate" / "annotations.parquet").is_file()
