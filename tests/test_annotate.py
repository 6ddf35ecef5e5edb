"""Annotation stage: the seeded VLM-like simulation, the synthetic protocol and the stage's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coreg.aggregate import run_aggregate
from coreg.annotate import (
    SUMMARY_FILE,
    run_annotate,
    simulate_vlm_annotations,
    synthetic_candidates,
)
from coreg.config import AnnotateConfig, DataConfig, RunConfig
from coreg.contracts import read_annotations, read_candidates, read_classes, read_samples
from coreg.data import ImageDataset, load_dataset, split_samples
from coreg.errors import CoregError


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataset, np.ndarray]:
    ds = load_dataset(DataConfig(source="digits"))
    return ds, split_samples(ds.sample_ids, 0.2, 0)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    config = RunConfig()
    out = tmp_path_factory.mktemp("run") / "annotate"
    assert run_annotate(config, out) == out
    return config, out


def test_simulation_is_seeded(digits: tuple[ImageDataset, np.ndarray]) -> None:
    ds, split = digits
    a = simulate_vlm_annotations(ds, split, AnnotateConfig(num_annotators=5))
    b = simulate_vlm_annotations(ds, split, AnnotateConfig(num_annotators=5))
    c = simulate_vlm_annotations(ds, split, AnnotateConfig(num_annotators=5, seed=1))
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.probs, b.probs)
    assert not np.array_equal(a.labels, c.labels)
    assert a.annotator_names == [f"sim-prompt-0{i}" for i in range(5)]
    assert a.probs.shape == (5, len(ds), 10) and np.allclose(a.probs.sum(axis=2), 1, atol=1e-5)


def test_noise_is_instance_dependent(digits: tuple[ImageDataset, np.ndarray]) -> None:
    ds, split = digits
    sim = simulate_vlm_annotations(ds, split, AnnotateConfig())
    y = ds.labels
    teacher = sim.teacher_logits.argmax(axis=1)
    wrong = sim.labels != y[None]  # (M, n)
    # Annotators fail where the teacher fails: errors follow its confusions, not a coin flip.
    assert wrong[:, teacher != y].mean() > 0.6 > 0.2 > wrong[:, teacher == y].mean()
    # Their wrong answers mostly repeat the teacher's wrong answer (chance would be 1/9).
    same = (sim.labels == teacher[None]) & wrong & (teacher != y)[None]
    assert same.sum() / (wrong & (teacher != y)[None]).sum() > 0.5
    # Error rates differ a lot across classes (uniform noise would give similar rates).
    per_class = np.array([wrong[:, y == c].mean() for c in range(10)])
    assert per_class.max() - per_class.min() > 0.3


def test_teacher_never_sees_test_labels(digits: tuple[ImageDataset, np.ndarray]) -> None:
    ds, split = digits
    cfg = AnnotateConfig(num_annotators=3)
    base = simulate_vlm_annotations(ds, split, cfg)
    assert (split[base.teacher_indices] == "train").all()
    labels = ds.labels.copy()
    test = split == "test"
    labels[test] = (labels[test] + 3) % 10
    shuffled = ImageDataset(ds.sample_ids, ds.class_names, labels, arrays=ds.arrays, source="digits")
    other = simulate_vlm_annotations(shuffled, split, cfg)
    assert np.array_equal(base.labels, other.labels) and np.array_equal(base.probs, other.probs)


def test_simulation_needs_labels(digits: tuple[ImageDataset, np.ndarray]) -> None:
    ds, split = digits
    unlabelled = ImageDataset(ds.sample_ids, ds.class_names, np.full(len(ds), -1), arrays=ds.arrays, source="x")
    with pytest.raises(CoregError, match="needs ground-truth labels"):
        simulate_vlm_annotations(unlabelled, split, AnnotateConfig())


def test_stage_files_and_summary_match(annotated: tuple[RunConfig, Path]) -> None:
    config, out = annotated
    assert sorted(p.name for p in out.iterdir()) == [
        "annotation_summary.json",
        "annotations.parquet",
        "classes.json",
        "config.yaml",
        "lineage.json",
        "samples.parquet",
    ]
    names = read_classes(out)
    samples = read_samples(out)
    ann = read_annotations(out, len(names))
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert len(ann) == len(samples) * config.annotate.num_annotators
    assert ann["annotator"].nunique() == 27 and ann["annotator"].min() == "sim-prompt-00"
    # Recompute noise rate, mean |S| and the accuracies from the files alone.
    truth = samples.set_index("sample_id")["label"]
    sets = ann.groupby("sample_id")["label"].agg(set)
    noise = np.mean([truth[s] not in sets[s] for s in samples["sample_id"]])
    size = sets.map(len).mean()
    zero = ann[ann["annotator"] == "sim-prompt-00"].set_index("sample_id")["label"]
    assert summary["noise_rate"] == pytest.approx(noise)
    assert summary["mean_set_size"] == pytest.approx(size)
    assert summary["zero_shot_accuracy"] == pytest.approx((zero[truth.index] == truth).mean())
    assert 0 < summary["majority_vote_accuracy"] < 1
    test_ids = samples.loc[samples["split"] == "test", "sample_id"]
    assert summary["by_split"]["test"]["noise_rate"] == pytest.approx(
        np.mean([truth[s] not in sets[s] for s in test_ids])
    )
    probs = np.stack(ann["probs"].to_numpy())
    assert np.allclose(probs[np.arange(len(ann)), ann["label"]], ann["probability"])


def test_default_simulation_is_hard_but_useful(annotated: tuple[RunConfig, Path]) -> None:
    summary = json.loads((annotated[1] / SUMMARY_FILE).read_text())
    assert 0.55 < summary["zero_shot_accuracy"] < 0.85
    assert 0.05 < summary["noise_rate"] < 0.3
    assert summary["mean_set_size"] > 1.5 and summary["mean_set_size"] < 3.5


def test_synthetic_protocol_rates() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, size=5000)
    drawn = synthetic_candidates(y, 10, q=0.3, eta=0.2, seed=0)
    rows = np.arange(len(y))
    assert np.array_equal(drawn.matrix, synthetic_candidates(y, 10, 0.3, 0.2, seed=0).matrix)
    noise = ~drawn.matrix[rows, y]
    assert np.array_equal(noise, drawn.swapped)
    assert noise.mean() == pytest.approx(0.2, abs=0.02)
    kept = ~drawn.swapped
    wrong = drawn.matrix[kept].sum(axis=1) - 1
    assert (wrong / 9).mean() == pytest.approx(0.3, abs=0.02)
    assert drawn.matrix.sum(axis=1).mean() == pytest.approx(1 + 9 * 0.3, abs=0.1)
    assert drawn.swap_skipped == 0


def test_synthetic_swap_skipped_when_no_free_label() -> None:
    drawn = synthetic_candidates(np.zeros(50, dtype=int), 3, q=1.0, eta=1.0, seed=0)
    assert drawn.matrix.all() and drawn.swap_skipped == 50 and not drawn.swapped.any()


def test_synthetic_stage_union_rebuilds_sets(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"data": {"limit": 400}, "annotate": {"method": "synthetic", "seed": 3}})
    run_annotate(config, tmp_path / "ann")
    samples = read_samples(tmp_path / "ann")
    drawn = synthetic_candidates(samples["label"].to_numpy(), 10, 0.3, 0.2, seed=3)
    run_aggregate(config, tmp_path / "ann", tmp_path / "agg")
    cands = read_candidates(tmp_path / "agg", 10)
    rebuilt = np.zeros((len(cands), 10), dtype=bool)
    for i, labels in enumerate(cands["candidates"]):
        rebuilt[i, labels] = True
    assert cands["sample_id"].tolist() == samples["sample_id"].tolist()
    assert np.array_equal(rebuilt, drawn.matrix)
    summary = json.loads((tmp_path / "ann" / SUMMARY_FILE).read_text())
    quality = json.loads((tmp_path / "agg" / "quality.json").read_text())
    assert summary["noise_rate"] == pytest.approx(quality["all"]["noise_rate"])
    assert summary["zero_shot_accuracy"] is None


def test_failed_stage_leaves_no_folder(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    config = RunConfig.model_validate({"data": {"source": "folder", "path": str(tmp_path), "class_names": ["x"]}})
    with pytest.raises(CoregError, match="needs ground-truth labels"):
        run_annotate(config, tmp_path / "out")
    config.annotate.method = "synthetic"
    with pytest.raises(CoregError, match="needs the true label"):
        run_annotate(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_teacher_tolerates_classes_missing_from_train(digits: tuple[ImageDataset, np.ndarray]) -> None:
    ds, split = digits
    keep = np.flatnonzero(ds.labels < 3)
    small = ds.subset(keep)
    small_split = split[keep].copy()
    small_split[small.labels == 2] = "test"  # class 2 has no train sample
    sim = simulate_vlm_annotations(small, small_split, AnnotateConfig(num_annotators=3))
    assert set(small.labels[sim.teacher_indices].tolist()) == {0, 1}
    assert sim.probs.shape == (3, len(small), 10)
    small_split[small.labels == 1] = "test"
    with pytest.raises(CoregError, match="at least 2 classes"):
        simulate_vlm_annotations(small, small_split, AnnotateConfig())


def test_animal_mnist_limit_keeps_every_class(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"data": {"source": "animal_mnist", "limit": 100}})
    run_annotate(config, tmp_path / "ann")
    samples = read_samples(tmp_path / "ann")
    assert np.bincount(samples["label"], minlength=10).tolist() == [10] * 10
