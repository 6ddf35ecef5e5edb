"""The command line end to end: stages alone and chained, and what users see on errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from coreg.cli import main

# A budget small enough for a test, large enough that every stage does real work.
TINY = [
    "data.limit=360",
    "train.epochs=3",
    "train.warmup_epochs=1",
    "train.rampup_epochs=1",
    "train.reg_start_offset=0",
    "train.batch_size=32",
    "train.warmup_batch_size=64",
    "train.queue_size=128",
    "train.device=cpu",
    "annotate.num_annotators=5",
]


def _args(out: Path, *extra: str) -> list[str]:
    args = ["--quiet", "--set", f"output_dir={out}"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def _weights(model_path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(model_path, weights_only=True)
    return {k: v for k, v in _flatten(state) if isinstance(v, torch.Tensor)}


def _flatten(obj: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [item for k, v in obj.items() for item in _flatten(v, f"{prefix}{k}.")]
    return [(prefix, obj)]


@pytest.mark.slow
def test_stages_alone_equal_the_chained_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alone = tmp_path / "alone"
    for stage in ("annotate", "aggregate", "train", "evaluate"):
        assert main([stage, *_args(alone)]) == 0, capsys.readouterr().err
    chained = tmp_path / "chained"
    assert main(["run", *_args(chained)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"report: {chained / 'evaluate' / 'report.md'}" in out

    for root in (alone, chained):
        for stage in ("annotate", "aggregate", "train", "evaluate"):
            folder = root / stage
            assert (folder / "config.yaml").is_file()
            assert (folder / "lineage.json").is_file()
        for name in ("annotations.parquet", "samples.parquet", "classes.json"):
            assert (root / "annotate" / name).is_file()
        assert (root / "aggregate" / "candidates.parquet").is_file()
        assert (root / "train" / "model.pt").is_file()
        assert (root / "train" / "checkpoints" / "last.pt").is_file()
        for name in ("metrics.json", "report.md", "predictions.parquet", "confusion_matrix.png",
                     "training_curves.png"):
            assert (root / "evaluate" / name).is_file(), name

    pd.testing.assert_frame_equal(pd.read_parquet(alone / "aggregate" / "candidates.parquet"),
                                  pd.read_parquet(chained / "aggregate" / "candidates.parquet"))
    a, b = _weights(alone / "train" / "model.pt"), _weights(chained / "train" / "model.pt")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)

    metrics = json.loads((chained / "evaluate" / "metrics.json").read_text())
    samples = pd.read_parquet(chained / "annotate" / "samples.parquet")
    n_test = int((samples["split"] == "test").sum())
    assert metrics["model"]["n"] == n_test
    assert 0.0 <= metrics["model"]["accuracy"] <= 1.0
    assert sum(map(sum, metrics["model"]["confusion_matrix"])) == n_test
    assert 0.0 <= metrics["zero_shot"]["plurality_vote_accuracy"] <= 1.0
    report = (chained / "evaluate" / "report.md").read_text()
    assert "Co-Reg" in report and "plurality vote" in report


def test_bad_config_value_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["annotate", *_args(tmp_path, "train.lr=-0.1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [err[-1]] and "train.lr" in err[-1]
    assert not (tmp_path / "annotate").exists()


def test_missing_previous_stage_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["aggregate", *_args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "annotate") in err and "not found" in err
    assert not (tmp_path / "aggregate").exists()


@pytest.mark.slow
def test_annotations_of_another_data_set_are_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["annotate", *_args(tmp_path, "data.source=animal_mnist", "data.limit=100")]) == 0
    assert main(["aggregate", *_args(tmp_path, "data.source=animal_mnist", "data.limit=100")]) == 0
    capsys.readouterr()
    code = main(["train", *_args(tmp_path)])  # digits, but the candidates are animal-mnist's
    err = capsys.readouterr().err
    assert code == 2
    assert "different data set" in err
    assert not (tmp_path / "train" / "model.pt").exists()


@pytest.mark.slow
def test_few_shot_labels_reach_the_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Human labels given to annotate become single-label, trusted rows of the training split."""
    assert main(["annotate", *_args(tmp_path)]) == 0
    samples = pd.read_parquet(tmp_path / "annotate" / "samples.parquet")
    train = samples[samples["split"] == "train"].head(6)
    names = json.loads((tmp_path / "annotate" / "classes.json").read_text())["class_names"]
    labels = tmp_path / "human.csv"
    pd.DataFrame({"sample_id": train["sample_id"], "label": [names[i] for i in train["label"]]}).to_csv(
        labels, index=False)
    assert main(["annotate", *_args(tmp_path), "--few-shot", str(labels)]) == 0
    assert main(["aggregate", *_args(tmp_path)]) == 0
    cands = pd.read_parquet(tmp_path / "aggregate" / "candidates.parquet").set_index("sample_id")
    few = cands.loc[train["sample_id"]]
    assert few["few_shot"].all()
    assert [list(c) for c in few["candidates"]] == [[int(y)] for y in train["label"]]
    assert main(["train", *_args(tmp_path)]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    roles = pd.read_parquet(tmp_path / "train" / "train_roles.parquet").set_index("sample_id")
    assert summary["few_shot_samples"] == int((roles.loc[train["sample_id"], "role"] == "fit").sum()) > 0
