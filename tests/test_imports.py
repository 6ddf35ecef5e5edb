"""Imported VLM answers (free text, duplicates, unknown ids), few-shot labels, skipped samples in aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreg.aggregate import run_aggregate
from coreg.annotate import run_annotate
from coreg.annotate.answers import AnswerMapper
from coreg.config import RunConfig
from coreg.contracts import (
    read_annotations,
    read_candidates,
    read_few_shot,
    read_samples,
    write_annotations,
    write_classes,
    write_samples,
    write_skipped,
)
from coreg.data import DIGIT_NAMES
from coreg.errors import CoregError

ANIMALS = ["cat", "dog", "sea lion", "lion", "Bus", "puppy", "glasses"]


# ----------------------------------------------------------------------------- answer mapping
@pytest.mark.parametrize(
    ("answer", "label", "reason"),
    [
        ("Cats.", 0, "exact"),
        ("  A DOG!! ", 1, "exact"),
        ("it is a sea lion", 2, "phrase"),  # 'lion' inside 'sea lion' does not count
        ("lion", 3, "exact"),
        ("buses", 4, "exact"),
        ("two puppies", 5, "phrase"),
        ("glass", 6, "exact"),
        ("a hound", 1, "exact"),  # synonym
        ("a cat and a dog", None, "ambiguous"),
        ("a car", None, "no_match"),
        ("...", None, "empty"),
        ("The", None, "empty"),
    ],
)
def test_free_text_mapping(answer: str, label: int | None, reason: str) -> None:
    mapper = AnswerMapper(ANIMALS, {"dog": ["hound"]})
    match = mapper.match(answer)
    assert (match.label, match.reason) == (label, reason)


def test_bad_synonym_tables_are_errors() -> None:
    with pytest.raises(CoregError, match=r"imports\.synonyms: 'cow' is not a class name"):
        AnswerMapper(ANIMALS, {"cow": ["cattle"]}, "imports.synonyms")
    with pytest.raises(CoregError, match="expected a list of strings"):
        AnswerMapper(ANIMALS, {"cat": "kitty"}, "imports.synonyms")  # type: ignore[dict-item]


ANY_VALUE = st.one_of(
    st.text(), st.text(alphabet=st.sampled_from(list("catdogsLION .,!-_'"))), st.none(), st.integers(),
    st.floats(allow_nan=True), st.binary(), st.lists(st.text(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(answer=ANY_VALUE, names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True),
       synonyms=st.lists(st.text(max_size=8), max_size=3))
def test_mapping_never_crashes_with_anything_but_coreg_error(answer: object, names: list[str],
                                                             synonyms: list[str]) -> None:
    try:
        mapper = AnswerMapper(names, {names[0]: synonyms})
        match = mapper.match(answer)
    except CoregError:
        return
    assert match.label is None or 0 <= match.label < len(names)
    assert isinstance(answer, str)
    assert (match.label is None) == (match.reason in ("empty", "no_match", "ambiguous"))


# ----------------------------------------------------------------------------- import files
def _digits(tmp_path: Path, **annotate: object) -> RunConfig:
    return RunConfig.model_validate({
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "digits", "limit": 60},
        "annotate": {"num_annotators": 3, **annotate},
    })


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_imported_answers_unknown_duplicates_and_missing_ids(tmp_path: Path) -> None:
    rows = [
        {"sample_id": "digits-00000", "annotator": "llava", "answer": "This is the digit zero.", "score": 0.9},
        {"sample_id": "digits-00001", "annotator": "llava", "answer": "ONE"},
        {"sample_id": "digits-00002", "annotator": "llava", "answer": "a seven"},  # replaced below
        {"sample_id": "digits-00002", "annotator": "llava", "answer": "Two!"},  # duplicate: last wins
        {"sample_id": "digits-00003", "annotator": "llava", "answer": "no idea"},  # unknown answer
        {"sample_id": "digits-00004", "annotator": "llava", "answer": "three or eight"},  # ambiguous
        {"sample_id": "digits-99999", "annotator": "llava", "answer": "one"},  # id not in the data set
        {"sample_id": "digits-00059", "annotator": "gpt4v", "label": "nine"},
        {"sample_id": "digits-00005", "annotator": "gpt4v", "label": 5},  # class index
    ]
    jsonl = _write_jsonl(tmp_path / "answers.jsonl", rows)
    csv = tmp_path / "service.csv"
    pd.DataFrame({"sample_id": ["digits-00000", "digits-00010", "digits-00011"],
                  "answer": ["0", "Eights", "sixes"]}).to_csv(csv, index=False)
    config = _digits(tmp_path, imports=[{"path": str(jsonl)},
                                        {"path": str(csv), "annotator": "service",
                                         "synonyms": {"zero": ["0"]}}])
    out = run_annotate(config, tmp_path / "ann", progress=False)
    ann = read_annotations(out, 10)
    llava = ann[ann["annotator"] == "llava"].set_index("sample_id")
    assert llava["label"].to_dict() == {"digits-00000": 0, "digits-00001": 1, "digits-00002": 2}
    assert llava.loc["digits-00000", "probability"] == pytest.approx(0.9)
    assert np.isnan(llava.loc["digits-00001", "probability"])
    gpt = ann[ann["annotator"] == "gpt4v"].set_index("sample_id")["label"].to_dict()
    assert gpt == {"digits-00059": 9, "digits-00005": 5}
    service = ann[ann["annotator"] == "service"].set_index("sample_id")["label"].to_dict()
    assert service == {"digits-00000": 0, "digits-00010": 8, "digits-00011": 6}
    assert ann["annotator"].str.startswith("sim-prompt").sum() == 60 * 3  # imports add to the simulation

    summary = json.loads((out / "annotation_summary.json").read_text())
    stats = summary["imports"][0]["annotators"]["llava"]
    assert (stats["rows"], stats["used"], stats["duplicates"]) == (7, 3, 1)
    assert (stats["unmatched"], stats["unmatched_no_match"], stats["unmatched_ambiguous"]) == (2, 1, 1)
    assert stats["unknown_samples"] == 1 and stats["unknown_sample_examples"] == ["digits-99999"]
    assert set(stats["unmatched_examples"]) == {"no idea", "three or eight"}
    assert summary["imports"][1]["annotators"]["service"]["used"] == 3

    agg = run_aggregate(config, out, tmp_path / "agg")
    cands = read_candidates(agg, 10).set_index("sample_id")
    assert 0 in cands.loc["digits-00000", "candidates"] and 8 in cands.loc["digits-00010", "candidates"]


def test_import_only_method_and_paths(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(images / name)
    answers = _write_jsonl(tmp_path / "vlm.jsonl", [
        {"path": "imgs/a.png", "answer": "a cat"},           # relative to the answers file
        {"path": str(images / "b.png"), "answer": "Dogs"},   # absolute path
        {"path": "c.png", "answer": "cat"},                  # the sample id itself
    ])
    config = RunConfig.model_validate({
        "data": {"source": "folder", "path": str(images), "class_names": ["cat", "dog"]},
        "annotate": {"method": "import", "imports": [{"path": str(answers)}]},
    })
    out = run_annotate(config, tmp_path / "ann", progress=False)
    ann = read_annotations(out, 2)
    assert ann.set_index("sample_id")["label"].to_dict() == {"a.png": 0, "b.png": 1, "c.png": 0}
    assert set(ann["annotator"]) == {"vlm"}  # the file name when there is no annotator column


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"sample_id": "nope-1", "annotator": "x", "answer": "one"}], "none of its 1 rows names a sample"),
        ([{"sample_id": "digits-00001", "annotator": "x", "answer": "banana"}], "none of its answers matches"),
        ([{"sample_id": "digits-00001", "annotator": "x", "answer": "one", "score": 3}],
         r"row 0: score 3.0 is outside \[0, 1\]"),
        ([{"sample_id": "digits-00001", "annotator": "sim-prompt-00", "answer": "one"}],
         "annotator name 'sim-prompt-00' is also a name"),
        ([{"id": "digits-00001", "answer": "one"}], "needs a 'sample_id' or 'path' column"),
    ],
)
def test_import_errors_are_one_line_naming_the_file(tmp_path: Path, rows: list[dict], expected: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CoregError, match=expected) as info:
        run_annotate(_digits(tmp_path, imports=[{"path": str(path)}]), tmp_path / "ann", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ann").exists()


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sample_id": "digits-00001", "answer": "one"}\n{oops\n')
    with pytest.raises(CoregError, match=r"bad.jsonl: line 2: not valid JSON"):
        run_annotate(_digits(tmp_path, imports=[{"path": str(path)}]), tmp_path / "ann", progress=False)


# ----------------------------------------------------------------------------- few-shot labels
def test_few_shot_labels_become_single_label_sets(tmp_path: Path) -> None:
    labels = tmp_path / "human.csv"
    pd.DataFrame({"sample_id": ["digits-00003", "digits-00007", "digits-00007", "unknown-1"],
                  "label": ["three", "Seven", "seven", "one"]}).to_csv(labels, index=False)
    config = _digits(tmp_path, few_shot_labels=str(labels))
    out = run_annotate(config, tmp_path / "ann", progress=False)
    few = read_few_shot(out, 10)
    assert few.set_index("sample_id")["label"].to_dict() == {"digits-00003": 3, "digits-00007": 7}
    summary = json.loads((out / "annotation_summary.json").read_text())
    assert summary["few_shot"]["unknown_samples"] == 1
    agg = run_aggregate(config, out, tmp_path / "agg")
    cands = read_candidates(agg, 10).set_index("sample_id")
    assert cands["few_shot"].sum() == 2
    assert list(cands.loc["digits-00007", "candidates"]) == [7] and cands.loc["digits-00007", "few_shot"]
    assert not cands.loc["digits-00008", "few_shot"]
    assert json.loads((agg / "quality.json").read_text())["few_shot_samples"] == 2


def test_conflicting_few_shot_labels_are_an_error(tmp_path: Path) -> None:
    labels = _write_jsonl(tmp_path / "human.jsonl", [{"sample_id": "digits-00003", "label": "three"},
                                                      {"sample_id": "digits-00003", "label": "eight"}])
    with pytest.raises(CoregError, match="row 1: sample 'digits-00003' is labelled both 'three' and 'eight'"):
        run_annotate(_digits(tmp_path, few_shot_labels=str(labels)), tmp_path / "ann", progress=False)
    labels = _write_jsonl(tmp_path / "human.jsonl", [{"sample_id": "digits-00003", "label": "tree"}])
    with pytest.raises(CoregError, match="row 0: label 'tree' is not a class name"):
        run_annotate(_digits(tmp_path, few_shot_labels=str(labels)), tmp_path / "ann", progress=False)


def test_candidates_without_few_shot_column_read_as_false(tmp_path: Path) -> None:
    table = pa.table({"sample_id": ["a", "b"], "candidates": [[0], [0, 1]]})
    pq.write_table(table, tmp_path / "candidates.parquet")
    cands = read_candidates(tmp_path, 2)
    assert cands["few_shot"].tolist() == [False, False] and cands["few_shot"].dtype == bool


# ----------------------------------------------------------------------------- skipped samples
def test_aggregate_drops_skipped_samples_only(tmp_path: Path) -> None:
    folder = tmp_path / "ann"
    write_classes(folder, DIGIT_NAMES[:3])
    write_samples(folder, pd.DataFrame({"sample_id": ["s0", "s1", "s2"], "split": ["train", "train", "test"],
                                        "label": [0, 1, 2]}))
    write_annotations(folder, pd.DataFrame({"sample_id": ["s0", "s2"], "annotator": ["a", "a"], "label": [0, 2],
                                            "probability": [np.nan, np.nan], "probs": [None, None]}))
    with pytest.raises(CoregError, match="sample 's1' has no annotation"):
        run_aggregate(RunConfig(), folder, tmp_path / "agg")
    write_skipped(folder, pd.DataFrame({"sample_id": ["s1"], "reason": ["cannot read image (truncated)"]}))
    out = run_aggregate(RunConfig(), folder, tmp_path / "agg")
    assert read_samples(out)["sample_id"].tolist() == ["s0", "s2"]
    assert read_candidates(out, 3)["sample_id"].tolist() == ["s0", "s2"]
    quality = json.loads((out / "quality.json").read_text())
    assert quality["skipped_samples"] == 1
    assert quality["skipped_examples"] == [{"sample_id": "s1", "reason": "cannot read image (truncated)"}]
    assert "1 sample(s) dropped" in (out / "quality.md").read_text()


def test_cli_import_and_few_shot_flags(tmp_path: Path) -> None:
    import yaml

    from coreg.cli import main

    answers = _write_jsonl(tmp_path / "llava.jsonl", [{"sample_id": "digits-00001", "answer": "one"}])
    human = _write_jsonl(tmp_path / "human.jsonl", [{"sample_id": "digits-00002", "label": "two"}])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_digits(tmp_path).model_dump(mode="json")))
    args = ["annotate", "--config", str(path), "--import", str(answers), "--few-shot", str(human), "--quiet"]
    assert main(args) == 0
    out = tmp_path / "runs" / "annotate"
    ann = read_annotations(out, 10)
    assert ann.loc[ann["annotator"] == "llava", "sample_id"].tolist() == ["digits-00001"]
    assert read_few_shot(out, 10)["sample_id"].tolist() == ["digits-00002"]
    assert main(["annotate", "--config", str(path), "--set", "annotate.method=import", "--quiet"]) == 2
