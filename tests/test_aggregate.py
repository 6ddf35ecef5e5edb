"""Aggregation rules on hand-made tables, the empty-set fallback, the quality summary and the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coreg.aggregate import aggregate_annotations, candidates_frame, plurality_vote, quality_summary, run_aggregate
from coreg.config import AggregateConfig, RunConfig
from coreg.contracts import (
    read_candidates,
    read_samples,
    write_annotations,
    write_classes,
    write_samples,
)
from coreg.errors import CoregError

K = 4
IDS = ["s0", "s1", "s2"]


def _table(with_probs: bool = True) -> pd.DataFrame:
    """Three annotators on three samples; probs chosen so every rule gives a different set."""
    rows = [
        # sample, annotator, label, probs
        ("s0", "a", 0, [0.6, 0.3, 0.1, 0.0]),
        ("s0", "b", 0, [0.5, 0.4, 0.1, 0.0]),
        ("s0", "c", 1, [0.4, 0.5, 0.1, 0.0]),
        ("s1", "a", 2, [0.1, 0.2, 0.6, 0.1]),
        ("s1", "b", 3, [0.1, 0.2, 0.3, 0.4]),
        ("s1", "c", 1, [0.1, 0.4, 0.2, 0.3]),
        ("s2", "a", 3, [0.0, 0.0, 0.1, 0.9]),
        ("s2", "b", 3, [0.0, 0.0, 0.3, 0.7]),
        ("s2", "c", 3, [0.0, 0.1, 0.1, 0.8]),
    ]
    df = pd.DataFrame(rows, columns=["sample_id", "annotator", "label", "probs"])
    df["probs"] = [np.asarray(p, dtype=np.float32) if with_probs else None for p in df["probs"]]
    df["probability"] = [p[lab] if p is not None else np.nan for p, lab in zip(df["probs"], df["label"], strict=True)]
    return df


def _sets(rule: str, **kw: float) -> list[list[int]]:
    agg = aggregate_annotations(_table(), IDS, K, AggregateConfig(rule=rule, **kw))
    return [np.flatnonzero(row).tolist() for row in agg.candidates]


def test_union() -> None:
    assert _sets("union") == [[0, 1], [1, 2, 3], [3]]


def test_topk() -> None:
    # mean probs: s0 [.5 .4 .1 0], s1 [.1 .267 .367 .267], s2 [0 .033 .167 .8]; s1 ties 1 and 3 -> lower index.
    assert _sets("topk", k=2) == [[0, 1], [1, 2], [2, 3]]
    assert _sets("topk", k=9) == [[0, 1, 2, 3]] * 3


def test_ratio() -> None:
    # s0: 0.4 >= 0.5*0.5; s1: .267 >= .5*.367 for 1 and 3; s2: only 3.
    assert _sets("ratio", k=5, ratio=0.5) == [[0, 1], [1, 2, 3], [3]]
    assert _sets("ratio", k=2, ratio=0.5) == [[0, 1], [1, 2], [3]]


def test_min_votes_with_empty_set_fallback() -> None:
    agg = aggregate_annotations(_table(), IDS, K, AggregateConfig(rule="min_votes", min_votes=2))
    # s1 has three different answers -> empty -> plurality vote (tie 1,2,3 -> lowest index, 1).
    assert [np.flatnonzero(r).tolist() for r in agg.candidates] == [[0], [1], [3]]
    assert agg.fallback.tolist() == [False, True, False]


def test_mean_probs_and_frame() -> None:
    agg = aggregate_annotations(_table(), IDS, K, AggregateConfig())
    frame = candidates_frame(IDS, agg)
    assert frame["candidates"].map(list).tolist() == [[0, 1], [1, 2, 3], [3]]
    assert np.allclose(frame["mean_probs"][0], [0.5, 0.4, 0.1, 0.0])
    no_probs = aggregate_annotations(_table(with_probs=False), IDS, K, AggregateConfig())
    assert candidates_frame(IDS, no_probs)["mean_probs"].isna().all()


@pytest.mark.parametrize("rule", ["topk", "ratio"])
def test_probability_rules_need_probs(rule: str) -> None:
    with pytest.raises(CoregError, match=f"ann.parquet: rule '{rule}' needs the annotators' probs"):
        aggregate_annotations(_table(with_probs=False), IDS, K, AggregateConfig(rule=rule), source="ann.parquet")


def test_unknown_and_unanswered_samples() -> None:
    with pytest.raises(CoregError, match=r"row 0: sample 's0' is not in samples\.parquet"):
        aggregate_annotations(_table(), ["s1", "s2"], K, AggregateConfig())
    with pytest.raises(CoregError, match="sample 's9' has no annotation"):
        aggregate_annotations(_table(), [*IDS, "s9"], K, AggregateConfig())


def test_quality_summary_hand_computed() -> None:
    table = _table()
    samples = pd.DataFrame({"sample_id": IDS, "split": ["train", "train", "test"], "label": [1, 0, 3]})
    agg = aggregate_annotations(table, IDS, K, AggregateConfig())
    q = quality_summary(agg, table, samples, AggregateConfig())
    everything = q["all"]
    # sets [0,1], [1,2,3], [3]; truths 1, 0, 3 -> covered, not, covered.
    assert everything["mean_set_size"] == pytest.approx(2.0)
    assert everything["set_size_histogram"] == {"1": 1, "2": 1, "3": 1}
    assert everything["coverage"] == pytest.approx(2 / 3)
    assert everything["noise_rate"] == pytest.approx(1 / 3)
    # plurality: s0 -> 0, s1 -> tie -> 1, s2 -> 3; accuracy vs truths 1, 0, 3 = 1/3.
    assert everything["plurality_accuracy"] == pytest.approx(1 / 3)
    ann = everything["annotators"]
    # a: 0,2,3 vs plurality 0,1,3 -> 2/3 agree; vs truth 1,0,3 -> 1/3 correct.
    assert ann["a"] == {"answered": 3, "agreement": pytest.approx(2 / 3), "accuracy": pytest.approx(1 / 3)}
    # c: 1,1,3 -> agree 2/3 (s1, s2); correct 2/3 (s0, s2).
    assert ann["c"]["agreement"] == pytest.approx(2 / 3) and ann["c"]["accuracy"] == pytest.approx(2 / 3)
    train, test = q["splits"]["train"], q["splits"]["test"]
    assert train["n_samples"] == 2 and train["coverage"] == pytest.approx(0.5)
    assert test["coverage"] == 1.0 and test["mean_set_size"] == 1.0
    assert test["annotators"]["b"] == {"answered": 1, "agreement": 1.0, "accuracy": 1.0}


def test_quality_without_labels() -> None:
    table = _table()
    samples = pd.DataFrame({"sample_id": IDS, "split": ["train"] * 3, "label": [-1] * 3})
    agg = aggregate_annotations(table, IDS, K, AggregateConfig())
    q = quality_summary(agg, table, samples, AggregateConfig())
    assert q["all"]["coverage"] is None and q["all"]["noise_rate"] is None
    assert q["all"]["annotators"]["a"]["accuracy"] is None
    assert q["splits"]["test"]["n_samples"] == 0 and q["splits"]["test"]["mean_set_size"] is None


def _annotate_dir(tmp_path: Path, table: pd.DataFrame, ids: list[str]) -> Path:
    folder = tmp_path / "ann"
    write_classes(folder, ["w", "x", "y", "z"])
    write_samples(folder, pd.DataFrame({"sample_id": ids, "split": "train", "label": [1, 0, 3][: len(ids)]}))
    write_annotations(folder, table)
    return folder


def test_run_aggregate_writes_folder(tmp_path: Path) -> None:
    folder = _annotate_dir(tmp_path, _table(), IDS)
    out = run_aggregate(RunConfig(), folder, tmp_path / "agg")
    assert sorted(p.name for p in out.iterdir()) == [
        "candidates.parquet",
        "classes.json",
        "config.yaml",
        "lineage.json",
        "quality.json",
        "quality.md",
        "quality_report.html",
        "quality_report.md",
        "samples.parquet",
    ]
    cands = read_candidates(out, K)
    assert cands["candidates"].map(list).tolist() == [[0, 1], [1, 2, 3], [3]]
    assert read_samples(out).equals(read_samples(folder))
    quality = json.loads((out / "quality.json").read_text())
    assert quality["all"]["coverage"] == pytest.approx(2 / 3)
    assert "| all | 3 | 2.00 | 66.7% | 33.3% |" in (out / "quality.md").read_text()


def test_run_aggregate_errors_leave_no_folder(tmp_path: Path) -> None:
    folder = _annotate_dir(tmp_path, _table(with_probs=False), IDS)
    config = RunConfig.model_validate({"aggregate": {"rule": "topk"}})
    with pytest.raises(CoregError, match=r"ann/annotations.parquet: rule 'topk' needs"):
        run_aggregate(config, folder, tmp_path / "agg")
    assert not (tmp_path / "agg").exists()
    folder = _annotate_dir(tmp_path, _table(), ["s0", "s1"])
    with pytest.raises(CoregError, match=r"row 6: sample 's2' is not in samples\.parquet"):
        run_aggregate(RunConfig(), folder, tmp_path / "agg")
    assert not (tmp_path / "agg").exists()


def test_plurality_vote_matrix_and_rows() -> None:
    votes = np.array([[1, 2, 0], [1, 1, 1], [0, 0, 0]])
    assert plurality_vote(votes).tolist() == [1, 0, 0]
    rows = pd.DataFrame({"_row": [0, 0, 1, 1, 1], "label": [2, 2, 0, 1, 1]})
    assert plurality_vote(rows, 3, n_samples=3).tolist() == [2, 1, 0]
