"""The accuracy benchmark harness (benchmarks/accuracy.py) on a tiny cell, so it cannot rot unnoticed.

The benchmark itself is not run in CI (minutes to hours); this runs one cell of it through the real
stages on 160 digits with a 2-epoch budget and checks the rows and the table it builds from them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = module
    spec.loader.exec_module(module)
    return module


def test_one_cell_runs_every_stage_and_reports_candidate_quality(accuracy: ModuleType, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_config = accuracy.cell_config

    def tiny(dataset: str, protocol: str, seed: int, quick: bool, limit: int | None,
             overrides: list[str] | None = None) -> dict:
        raw = real_config(dataset, protocol, seed, quick, limit, overrides)
        raw["annotate"]["num_annotators"] = 3
        raw["train"].update(epochs=2, warmup_epochs=1, rampup_epochs=1, reg_start_offset=0, batch_size=32,
                            warmup_batch_size=32, queue_size=64, device="cpu")
        return raw

    monkeypatch.setattr(accuracy, "cell_config", tiny)
    text, rows = accuracy._cell("digits", "synthetic", 1, True, 160, ["zero_shot", "soft_distill", "coreg"], 1,
                                ["aggregate.rule=min_votes", "aggregate.min_votes=1"])
    assert text.startswith("digits / synthetic / seed 1\n")
    # soft_distill is skipped on the synthetic protocol: it has no probabilities to distil.
    assert [r["method"] for r in rows] == ["zero_shot", "coreg"]
    for row in rows:
        assert row["dataset"] == "digits" and row["protocol"] == "synthetic" and row["seed"] == 1
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 <= row["noise_rate"] <= 1.0 and 1.0 <= row["mean_set_size"] <= 10.0
    assert isinstance(rows[1]["classes_without_clean"], int)
    assert rows[0]["noise_rate"] == rows[1]["noise_rate"]  # every method trains on the same candidate sets


def test_table_gives_mean_and_sample_deviation_over_seeds(accuracy: ModuleType) -> None:
    rows = [{"dataset": "digits", "protocol": "vlm_low", "method": "coreg", "seed": s, "test_accuracy": a,
             "noise_rate": 0.1, "mean_set_size": 2.0, "train_seconds": 10.0} for s, a in enumerate([0.8, 0.9, 1.0])]
    table = accuracy.markdown(rows)
    assert "| digits | vlm_low | coreg | 0.900 ± 0.100 | 0.100 ± 0.000 | 2.00 ± 0.00 | 10.0 ± 0.0 | 3 |" in table


def test_quick_setting_covers_animal_mnist_on_a_balanced_subset(accuracy: ModuleType) -> None:
    from coreg.config import parse_config
    from coreg.data.sources import load_dataset

    quick = accuracy.cell_config("animal-mnist", "vlm_low", 0, True, None)["data"]
    full = accuracy.cell_config("animal-mnist", "vlm_low", 0, False, None)["data"]
    assert (quick["image_size"], quick["limit"]) == (16, 720)
    assert full["image_size"] == 28 and "limit" not in full
    assert accuracy.cell_config("animal-mnist", "vlm_low", 0, True, 100)["data"]["limit"] == 100  # --limit wins
    assert accuracy.cell_config("digits", "vlm_low", 0, True, None)["data"]["image_size"] == 8  # native size
    assert accuracy.cell_config("digits", "vlm_low", 0, False, None)["data"]["image_size"] == 16
    data = load_dataset(parse_config({"data": quick}).data)
    counts = [int((data.labels == k).sum()) for k in range(10)]
    assert len(data) == 720 and counts == [72] * 10  # the first ids interleave the classes


def test_overrides_reach_every_cell_config(accuracy: ModuleType) -> None:
    from coreg.config import parse_config

    raw = accuracy.cell_config("digits", "vlm_high", 2, False, None,
                               ["aggregate.rule=min_votes", "aggregate.min_votes=3", "train.reg_weight=0"])
    config = parse_config(raw)
    assert (config.aggregate.rule, config.aggregate.min_votes, config.train.reg_weight) == ("min_votes", 3, 0.0)
    assert config.train.seed == 2 and config.annotate.seed == 2  # the cell's own fields are kept
    from coreg.errors import CoregError

    with pytest.raises(CoregError, match=r"expected key\.sub=value"):
        accuracy.cell_config("digits", "vlm_high", 2, False, None, ["aggregate.rule"])


def test_candidate_ambiguity_finds_class_wide_companions() -> None:
    module = _load("candidate_ambiguity")
    # Class 0 images always come with class 1 in S; class 1 images never carry 0; one class-2 set misses 2.
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    sets = np.zeros((8, 3), dtype=bool)
    sets[[0, 1, 2, 3], 0] = sets[[0, 1, 2, 3], 1] = True
    sets[[4, 5], 1] = True
    sets[6, 2] = True
    sets[7, 0] = True
    votes = sets.astype(int) + np.eye(3, dtype=int)[[1, 0, 0, 0, 1, 1, 2, 0]]  # plurality: 1,0,0,0,1,1,2,0
    stats = module.set_statistics(sets, votes, labels, blind=0.8)
    assert stats["noise_rate"] == pytest.approx(1 / 8)
    assert stats["mean_set_size"] == pytest.approx(12 / 8)
    assert stats["plurality_accuracy"] == pytest.approx(6 / 8)
    assert stats["blind_pairs"] == [(0, 1)]
    assert stats["mean_companion_rate"] == pytest.approx(1 / 3)
    first = stats["per_class"][0]
    assert (first["recall"], first["companion"], first["companion_rate"]) == (1.0, 1, 1.0)
    assert first["plurality_accuracy"] == pytest.approx(0.75)
    assert stats["per_class"][2]["recall"] == pytest.approx(0.5)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_diagnostics_score_the_trainers_own_split(monkeypatch: pytest.MonkeyPatch) -> None:
    diagnose = _load("diagnose_split")
    real_config = diagnose.cell_config

    def tiny(dataset: str, protocol: str, seed: int, quick: bool, limit: int | None,
             overrides: list[str] | None = None) -> dict:
        raw = real_config(dataset, protocol, seed, quick, 200, overrides)
        raw["annotate"]["num_annotators"] = 3
        raw["train"].update(epochs=3, warmup_epochs=1, rampup_epochs=1, reg_start_offset=0, batch_size=32,
                            warmup_batch_size=32, queue_size=64, device="cpu")
        return raw

    monkeypatch.setattr(diagnose, "cell_config", tiny)
    results = diagnose.diagnose("digits", "synthetic", 0, True, ["coreg", "dividemix"], [])
    for method in ("coreg", "dividemix"):
        rows = results[method]
        assert [(r["epoch"], r["net"]) for r in rows] == [(2, 1), (2, 2), (3, 1), (3, 2)]  # after warm-up only
        for r in rows:
            assert sum(r["clean_per_true_class"]) == r["clean"] <= sum(r["true_class_size"]) < 200
            assert 0.0 <= r["train_accuracy"] <= 1.0
    # Both methods are scored on the same fit samples (same roles split, same true labels).
    assert results["coreg"][0]["true_class_size"] == results["dividemix"][0]["true_class_size"]


def test_split_score_counts_precision_and_kept_share() -> None:
    diagnose = _load("diagnose_split")
    labels = np.array([0, 0, 1, 1, 2])
    record = {"epoch": 5, "prediction": [np.array([0, 1, 1, 1, 2])] * 2,
              "pseudo": [np.array([0, 1, 1, 0, 2])] * 2,
              "clean": [np.array([True, True, True, False, False])] * 2}
    rows = diagnose.score([record], labels)
    assert len(rows) == 2 and rows[0]["epoch"] == 5 and rows[1]["net"] == 2
    r = rows[0]
    assert r["train_accuracy"] == pytest.approx(0.8)
    assert r["clean"] == 3 and r["clean_precision"] == pytest.approx(2 / 3)
    assert r["correct_kept"] == pytest.approx(2 / 3)  # pseudo right on 0, 2, 4; of those 0 and 2 are clean
    assert r["clean_per_true_class"] == [2, 1, 0] and r["true_class_size"] == [2, 2, 1]
