"""Data contracts: round trips and one-line errors naming the file, row and column."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coreg import contracts
from coreg.errors import CoregError

K = 3


def _annotations(**changes: object) -> pd.DataFrame:
    df = pd.DataFrame({
        "sample_id": ["a", "a", "b"],
        "annotator": ["p0", "p1", "p0"],
        "label": [0, 1, 2],
        "probability": [0.7, 0.5, 0.9],
        "probs": [[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.05, 0.05, 0.9]],
    })
    for column, (row, value) in changes.items():
        df.at[row, column] = value
    return df


def test_annotations_round_trip(tmp_path: Path) -> None:
    contracts.write_annotations(tmp_path, _annotations())
    back = contracts.read_annotations(tmp_path, K)
    assert back["label"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(np.stack(back["probs"]), np.stack(_annotations()["probs"]), rtol=1e-6)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"label": (2, 3)}, "row 2: label 3 is not a class index in [0, 3)"),
        ({"probability": (1, 1.5)}, "row 1: probability 1.5 is outside [0, 1]"),
        ({"probs": (0, [0.5, 0.5])}, "row 0: probs must be 3 numbers, got 2"),
        ({"probs": (2, [np.nan, 0.5, 0.5])}, "row 2: probs must be finite and non-negative"),
        ({"probs": (1, [-0.1, 0.6, 0.5])}, "row 1: probs must be finite and non-negative"),
        ({"annotator": (1, "p0")}, "row 1: annotator 'p0' answers sample 'a' twice"),
    ],
)
def test_bad_annotations_name_the_row(tmp_path: Path, changes: dict, expected: str) -> None:
    contracts.write_annotations(tmp_path, _annotations(**changes))
    with pytest.raises(CoregError) as info:
        contracts.read_annotations(tmp_path, K)
    assert str(info.value) == f"{tmp_path / contracts.ANNOTATIONS_FILE}: {expected}"


def test_missing_column_and_unreadable_file(tmp_path: Path) -> None:
    pd.DataFrame({"sample_id": ["a"], "label": [0]}).to_parquet(tmp_path / contracts.ANNOTATIONS_FILE)
    with pytest.raises(CoregError, match="missing column"):
        contracts.read_annotations(tmp_path, K)
    (tmp_path / contracts.ANNOTATIONS_FILE).write_text("not parquet")
    with pytest.raises(CoregError, match="not a readable Parquet file"):
        contracts.read_annotations(tmp_path, K)


def test_candidates_empty_set_and_duplicates_are_refused(tmp_path: Path) -> None:
    ok = pd.DataFrame({"sample_id": ["a", "b"], "candidates": [[0, 2], [1]], "mean_probs": [None, None]})
    contracts.write_candidates(tmp_path, ok)
    assert contracts.read_candidates(tmp_path, K)["candidates"].map(list).tolist() == [[0, 2], [1]]
    contracts.write_candidates(tmp_path, ok.assign(candidates=[[0], []]))
    with pytest.raises(CoregError, match="row 1: sample 'b' has an empty candidate set"):
        contracts.read_candidates(tmp_path, K)
    contracts.write_candidates(tmp_path, ok.assign(sample_id=["a", "a"]))
    with pytest.raises(CoregError, match="row 1: duplicate sample_id 'a'"):
        contracts.read_candidates(tmp_path, K)


def test_class_names_must_be_unique_and_non_empty(tmp_path: Path) -> None:
    contracts.write_classes(tmp_path, ["cat", "cat"])
    with pytest.raises(CoregError, match="'cat' appears twice"):
        contracts.read_classes(tmp_path)
    contracts.write_classes(tmp_path, ["cat", " "])
    with pytest.raises(CoregError, match="class name #1 is empty"):
        contracts.read_classes(tmp_path)


def test_candidate_matrix_matches_the_sets() -> None:
    y = contracts.candidate_matrix([[0, 2], [1], []], K)
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])


def test_written_files_are_readable_by_others(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the result must get the umask's mode."""
    mask = os.umask(0o022)
    try:
        contracts.write_classes(tmp_path, ["cat"])
    finally:
        os.umask(mask)
    assert (tmp_path / contracts.CLASSES_FILE).stat().st_mode & 0o777 == 0o644
