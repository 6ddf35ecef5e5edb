"""On-disk data contracts between stages (all Parquet, plus one JSON file of class names).

Each stage writes these files into its output folder and the next stage reads them, so any
stage can run alone on a previous stage's folder. ``docs/data-contracts.md`` documents the
same formats for users who produce or consume them with other tools.

==================  ==================================================================
file                columns
==================  ==================================================================
classes.json        ``{"class_names": [...]}``, label ``i`` is ``class_names[i]``
samples.parquet     sample_id: string (unique), split: "train" | "test",
                    label: int64 ground truth or -1 when unknown (evaluation only)
annotations.parquet sample_id: string, annotator: string, label: int32,
                    probability: float32 (the annotator's probability of ``label``, null
                    when it gave none), probs: list<float32> of length K or null
candidates.parquet  sample_id: string (unique), candidates: list<int32> (non-empty,
                    sorted, unique), mean_probs: list<float32> of length K or null,
                    few_shot: bool (a human label; a missing column reads as False)
skipped.parquet     sample_id: string (unique), reason: string -- images the annotate
                    stage could not read (optional file; absent means none)
few_shot.parquet    sample_id: string (unique), label: int64 -- human labels for a few
                    samples, copied in by annotate (optional file)
==================  ==================================================================

Annotations are long-format: one row per (sample_id, annotator) pair, which is unique. An
annotator need not answer every sample, but every sample needs at least one answer. The
synthetic NPLL protocol (``coreg.annotate.synthetic``) writes its candidate set S as one row
per label in S from a per-class pseudo-annotator ``synthetic-<class index>`` (its top-1 is
that class, no probabilities), so the ``union`` rule rebuilds exactly S while the pair stays
unique.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coreg.atomic import atomic_path, write_json
from coreg.errors import CoregError

CLASSES_FILE = "classes.json"
SAMPLES_FILE = "samples.parquet"
ANNOTATIONS_FILE = "annotations.parquet"
CANDIDATES_FILE = "candidates.parquet"
SKIPPED_FILE = "skipped.parquet"
FEW_SHOT_FILE = "few_shot.parquet"

SAMPLES_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("split", pa.string()), ("label", pa.int64())]
)
ANNOTATIONS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("annotator", pa.string()),
        ("label", pa.int32()),
        ("probability", pa.float32()),
        ("probs", pa.list_(pa.float32())),
    ]
)
CANDIDATES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("candidates", pa.list_(pa.int32())),
        ("mean_probs", pa.list_(pa.float32())),
        ("few_shot", pa.bool_()),
    ]
)
SKIPPED_SCHEMA = pa.schema([("sample_id", pa.string()), ("reason", pa.string())])
FEW_SHOT_SCHEMA = pa.schema([("sample_id", pa.string()), ("label", pa.int64())])
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- helpers
def _write_table(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_table(path: Path, schema: pa.Schema, required: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CoregError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CoregError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise CoregError(f"{path}: missing column(s) {', '.join(missing)}")
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CoregError(f"{path}: columns do not match the contract ({str(err).splitlines()[0]})") from None
    return table.to_pandas()


def _check_unique_ids(df: pd.DataFrame, path: Path) -> None:
    if df["sample_id"].isna().any():
        row = int(np.flatnonzero(df["sample_id"].isna().to_numpy())[0])
        raise CoregError(f"{path}: row {row}: sample_id is missing")
    dup = df["sample_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise CoregError(f"{path}: row {row}: duplicate sample_id {df['sample_id'].iloc[row]!r}")


# ----------------------------------------------------------------------------- classes
def write_classes(directory: Path, class_names: Sequence[str]) -> None:
    write_json(Path(directory) / CLASSES_FILE, {"class_names": list(class_names)})


def read_classes(directory: Path) -> list[str]:
    path = Path(directory) / CLASSES_FILE
    if not path.is_file():
        raise CoregError(f"{path}: file not found")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["class_names"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise CoregError(f"{path}: expected a JSON object with a 'class_names' list") from None
    if not isinstance(names, list):
        raise CoregError(f"{path}: expected a JSON object with a 'class_names' list, got {type(names).__name__}")
    validate_class_names(names, str(path))
    return list(names)


def validate_class_names(names: Sequence[str], source: str) -> None:
    if not names:
        raise CoregError(f"{source}: the class name list is empty")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise CoregError(f"{source}: class name #{i} is empty")
        if name in seen:
            raise CoregError(f"{source}: class name {name!r} appears twice")
        seen.add(name)


# ----------------------------------------------------------------------------- samples
def write_samples(directory: Path, df: pd.DataFrame) -> None:
    _write_table(df, SAMPLES_SCHEMA, Path(directory) / SAMPLES_FILE)


def read_samples(directory: Path) -> pd.DataFrame:
    path = Path(directory) / SAMPLES_FILE
    df = _read_table(path, SAMPLES_SCHEMA, ["sample_id", "split"])
    _check_unique_ids(df, path)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CoregError(f"{path}: row {row}: split must be 'train' or 'test', got {df['split'].iloc[row]!r}")
    df["label"] = df["label"].fillna(-1).astype(np.int64)
    return df


# ----------------------------------------------------------------------------- annotations
def write_annotations(directory: Path, df: pd.DataFrame) -> None:
    _write_table(df, ANNOTATIONS_SCHEMA, Path(directory) / ANNOTATIONS_FILE)


def read_annotations(directory: Path, num_classes: int) -> pd.DataFrame:
    path = Path(directory) / ANNOTATIONS_FILE
    df = _read_table(path, ANNOTATIONS_SCHEMA, ["sample_id", "annotator", "label"])
    for column in ("sample_id", "annotator", "label"):
        if df[column].isna().any():
            row = int(np.flatnonzero(df[column].isna().to_numpy())[0])
            raise CoregError(f"{path}: row {row}: {column} is missing")
    labels = df["label"].to_numpy()
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CoregError(f"{path}: row {row}: label {labels[row]} is not a class index in [0, {num_classes})")
    prob = df["probability"].to_numpy(dtype=np.float64, na_value=np.nan)
    given = ~np.isnan(prob)
    bad = given & ((prob < 0) | (prob > 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CoregError(f"{path}: row {row}: probability {prob[row]} is outside [0, 1]")
    _check_prob_vectors(df["probs"], num_classes, path)
    dup = df.duplicated(["sample_id", "annotator"])
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise CoregError(f"{path}: row {row}: annotator {df['annotator'].iloc[row]!r} answers "
                         f"sample {df['sample_id'].iloc[row]!r} twice")
    return df


def _check_prob_vectors(probs: pd.Series, num_classes: int, path: Path) -> None:
    """Every non-null probability vector has K finite, non-negative entries (vectorised)."""
    given = probs.notna().to_numpy()
    if not given.any():
        return
    rows = np.flatnonzero(given)
    lengths = np.fromiter((len(v) for v in probs.to_numpy()[given]), dtype=np.int64, count=len(rows))
    bad_len = lengths != num_classes
    if bad_len.any():
        raise CoregError(f"{path}: row {rows[bad_len][0]}: probs must be {num_classes} numbers, "
                         f"got {lengths[bad_len][0]}")
    values = np.stack(probs.to_numpy()[given]).astype(np.float64)
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1)
    if bad.any():
        raise CoregError(f"{path}: row {rows[bad][0]}: probs must be finite and non-negative")


# ----------------------------------------------------------------------------- candidates
def write_candidates(directory: Path, df: pd.DataFrame) -> None:
    """Write candidates; a frame without ``few_shot`` (older producers) is written with False."""
    if "few_shot" not in df.columns:
        df = df.assign(few_shot=False)
    _write_table(df, CANDIDATES_SCHEMA, Path(directory) / CANDIDATES_FILE)


def read_candidates(directory: Path, num_classes: int) -> pd.DataFrame:
    path = Path(directory) / CANDIDATES_FILE
    df = _read_table(path, CANDIDATES_SCHEMA, ["sample_id", "candidates"])
    _check_unique_ids(df, path)
    for row, cands in enumerate(df["candidates"]):
        if cands is None or len(cands) == 0:
            raise CoregError(f"{path}: row {row}: sample {df['sample_id'].iloc[row]!r} has an empty candidate set")
        arr = np.asarray(cands)
        if (arr < 0).any() or (arr >= num_classes).any():
            raise CoregError(f"{path}: row {row}: candidate labels must be in [0, {num_classes})")
    # Files written before the column existed have no human labels.
    df["few_shot"] = df["few_shot"].fillna(False).astype(bool)
    return df


# ----------------------------------------------------------------------------- skipped / few-shot
def write_skipped(directory: Path, df: pd.DataFrame) -> None:
    """Images the annotate stage could not read, with the reason (one row per sample)."""
    _write_table(df, SKIPPED_SCHEMA, Path(directory) / SKIPPED_FILE)


def read_skipped(directory: Path) -> pd.DataFrame:
    """The skipped samples of an annotate folder; an empty frame when the file is absent."""
    path = Path(directory) / SKIPPED_FILE
    if not path.is_file():
        return pd.DataFrame({"sample_id": pd.Series([], dtype=object), "reason": pd.Series([], dtype=object)})
    df = _read_table(path, SKIPPED_SCHEMA, ["sample_id"])
    _check_unique_ids(df, path)
    df["reason"] = df["reason"].fillna("")
    return df


def write_few_shot(directory: Path, df: pd.DataFrame) -> None:
    _write_table(df, FEW_SHOT_SCHEMA, Path(directory) / FEW_SHOT_FILE)


def read_few_shot(directory: Path, num_classes: int) -> pd.DataFrame:
    """Human labels of an annotate folder; an empty frame when the file is absent."""
    path = Path(directory) / FEW_SHOT_FILE
    if not path.is_file():
        return pd.DataFrame({"sample_id": pd.Series([], dtype=object), "label": pd.Series([], dtype=np.int64)})
    df = _read_table(path, FEW_SHOT_SCHEMA, ["sample_id", "label"])
    _check_unique_ids(df, path)
    labels = df["label"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(labels) | (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CoregError(f"{path}: row {row}: label {df['label'].iloc[row]} is not a class index in [0, {num_classes})")
    df["label"] = df["label"].astype(np.int64)
    return df


def candidate_matrix(candidates: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Turn candidate lists into the n x K 0/1 matrix Y of the method."""
    y = np.zeros((len(candidates), num_classes), dtype=np.float32)
    lengths = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=len(candidates))
    if lengths.sum():
        rows = np.repeat(np.arange(len(candidates)), lengths)
        y[rows, np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates])] = 1.0
    return y
