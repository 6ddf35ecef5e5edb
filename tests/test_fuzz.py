"""Property-based tests: parsers, answer mapping and aggregation raise CoregError or succeed, never crash.

Bounded ``max_examples`` keep the whole file to a few seconds. The free-text mapping alone is
also fuzzed in tests/test_imports.py; here it is fuzzed through the import-file parser.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreg.aggregate import aggregate_annotations, candidates_frame
from coreg.annotate.answers import AnswerMapper
from coreg.annotate.imports import SampleIndex, read_few_shot_labels, read_imported_answers, read_rows
from coreg.config import AggregateConfig, ImportConfig
from coreg.contracts import read_annotations, read_candidates, read_classes, read_samples
from coreg.errors import CoregError

NAMES = ["cat", "dog", "sea lion", "t-rex"]
IDS = [f"s{i}" for i in range(6)]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CELL = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from([*IDS, *NAMES, "NaN", "-1", "1e400", "", "cat or dog", "0.5"]),
    st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
KEYS = st.sampled_from(["sample_id", "path", "answer", "label", "score", "annotator", "model", "x", ""])
RECORD = st.dictionaries(KEYS, CELL, max_size=6)


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="coreg-fuzz-"))


def _samples() -> SampleIndex:
    return SampleIndex(list(IDS), None, set(IDS) | {"s99"})


@SETTINGS
@given(lines=st.lists(st.one_of(RECORD.map(json.dumps), st.text(max_size=30), st.just("[1, 2]")), max_size=8))
def test_jsonl_import_files_never_crash(lines: list[str]) -> None:
    path = _tmp() / "vlm.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass") if _encodable(lines) else \
        path.write_bytes(b"\xff\xfe")
    _parse_import(path)


@SETTINGS
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".ndjson", ".txt"]))
def test_arbitrary_bytes_as_import_file_never_crash(data: bytes, suffix: str) -> None:
    path = _tmp() / f"vlm{suffix}"
    path.write_bytes(data)
    _parse_import(path)


@SETTINGS
@given(rows=st.lists(RECORD, min_size=1, max_size=8))
def test_csv_import_files_never_crash(rows: list[dict]) -> None:
    path = _tmp() / "vlm.csv"
    pd.DataFrame.from_records(rows).to_csv(path, index=False)
    _parse_import(path)


def _encodable(lines: list[str]) -> bool:
    try:
        "\n".join(lines).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_import(path: Path) -> None:
    try:
        read_rows(path, "annotate.imports[0].path")
        out = read_imported_answers([ImportConfig(path=str(path))], NAMES, _samples())
    except CoregError as err:
        assert "\n" not in str(err)
        return
    frame = out.frame
    assert set(frame["sample_id"]) <= set(IDS)
    assert frame["label"].between(0, len(NAMES) - 1).all()
    prob = frame["probability"].to_numpy(dtype=np.float64)
    assert ((prob >= 0) & (prob <= 1) | np.isnan(prob)).all()
    assert not frame.duplicated(["sample_id", "annotator"]).any()
    with contextlib.suppress(CoregError):
        read_few_shot_labels(str(path), NAMES, _samples())


@SETTINGS
@given(answer=st.text(max_size=40), synonyms=st.dictionaries(st.sampled_from(NAMES), st.lists(st.text(max_size=10),
                                                                                              max_size=3), max_size=2))
def test_answer_mapping_returns_a_valid_class_or_none(answer: str, synonyms: dict[str, list[str]]) -> None:
    try:
        match = AnswerMapper(NAMES, synonyms).match(answer)
    except CoregError:
        return
    assert match.label is None or 0 <= match.label < len(NAMES)
    # mapping is a pure function of the text: the same answer maps the same way again
    assert AnswerMapper(NAMES, synonyms).match(answer) == match


# ----------------------------------------------------------------------------- aggregation

PROB = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
FLOAT = st.one_of(st.floats(-1, 2, width=32), st.just(math.nan), st.just(math.inf))
VECTOR = st.one_of(st.none(), st.lists(FLOAT, max_size=5))
ROW = st.tuples(st.sampled_from([*IDS, "zz"]), st.sampled_from(["a", "b", "c"]), st.integers(-1, 5), PROB, VECTOR)
RULE = st.builds(
    lambda rule, k, ratio, votes: AggregateConfig(rule=rule, k=k, ratio=ratio, min_votes=votes),
    st.sampled_from(["union", "topk", "ratio", "min_votes"]), st.integers(1, 5), st.floats(0.01, 0.99),
    st.integers(1, 4),
)


def _annotation_file(rows: list[tuple]) -> Path:
    folder = _tmp()
    table = pa.table({
        "sample_id": pa.array([r[0] for r in rows], pa.string()),
        "annotator": pa.array([r[1] for r in rows], pa.string()),
        "label": pa.array([r[2] for r in rows], pa.int32()),
        "probability": pa.array([r[3] for r in rows], pa.float32()),
        "probs": pa.array([r[4] for r in rows], pa.list_(pa.float32())),
    })
    pq.write_table(table, folder / "annotations.parquet")
    return folder


@SETTINGS
@given(rows=st.lists(ROW, max_size=20), cfg=RULE, few=st.lists(st.integers(-1, 3), min_size=6, max_size=6))
def test_reading_and_aggregating_annotations_never_crash(rows: list[tuple], cfg: AggregateConfig,
                                                         few: list[int]) -> None:
    k = len(NAMES)
    try:
        df = read_annotations(_annotation_file(rows), k)
        agg = aggregate_annotations(df, IDS, k, cfg, few_shot_labels=np.asarray(few))
    except CoregError as err:
        assert "\n" not in str(err)
        return
    # Every sample ends with a non-empty set of valid classes; a few-shot label is the whole set.
    assert agg.candidates.shape == (len(IDS), k) and agg.candidates.any(axis=1).all()
    for i, label in enumerate(few):
        if label >= 0:
            assert agg.candidates[i].sum() == 1 and agg.candidates[i, label]
    frame = candidates_frame(IDS, agg)
    assert all(len(c) >= 1 and list(c) == sorted(set(c)) for c in frame["candidates"])
    if cfg.rule == "union":
        votes = agg.votes > 0
        plain = np.asarray(few) < 0
        assert (agg.candidates[plain] == votes[plain]).all()


@SETTINGS
@given(content=st.one_of(st.binary(max_size=60), st.dictionaries(st.text(max_size=12), CELL, max_size=3)
                         .map(lambda d: json.dumps(d).encode()),
                         st.lists(CELL, max_size=4).map(lambda v: json.dumps({"class_names": v}).encode())))
def test_classes_json_never_crashes(content: bytes) -> None:
    folder = _tmp()
    (folder / "classes.json").write_bytes(content)
    try:
        names = read_classes(folder)
    except CoregError:
        return
    assert names and all(isinstance(n, str) and n.strip() for n in names) and len(set(names)) == len(names)


@SETTINGS
@given(ids=st.lists(st.one_of(st.none(), st.sampled_from(IDS)), min_size=1, max_size=6),
       splits=st.lists(st.one_of(st.none(), st.sampled_from(["train", "test", "val", ""])), min_size=6, max_size=6),
       cands=st.lists(st.one_of(st.none(), st.lists(st.integers(-1, 5), max_size=4)), min_size=6, max_size=6))
def test_samples_and_candidates_tables_never_crash(ids: list, splits: list, cands: list) -> None:
    folder = _tmp()
    n = len(ids)
    pq.write_table(pa.table({"sample_id": pa.array(ids, pa.string()), "split": pa.array(splits[:n], pa.string())}),
                   folder / "samples.parquet")
    pq.write_table(pa.table({"sample_id": pa.array(ids, pa.string()),
                             "candidates": pa.array(cands[:n], pa.list_(pa.int32()))}), folder / "candidates.parquet")
    for read in (lambda: read_samples(folder), lambda: read_candidates(folder, len(NAMES))):
        try:
            df = read()
        except CoregError as err:
            assert "\n" not in str(err)
            continue
        assert df["sample_id"].notna().all() and not df["sample_id"].duplicated().any()
        if "candidates" in df:
            assert all(len(c) and min(c) >= 0 and max(c) < len(NAMES) for c in df["candidates"])


def test_fuzz_module_bounds() -> None:
    assert SETTINGS.max_examples <= 100 and not math.isnan(0.0)
