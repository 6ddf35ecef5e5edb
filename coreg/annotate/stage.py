"""Annotate stage: data set -> samples, per-annotator answers and a summary, written atomically.

Answer sources: the ``simulate_vlm`` or ``synthetic`` method (in memory), the ``open_clip``
method (sharded in a persistent work folder, resumable, see :mod:`coreg.annotate.shards`) or
none (``import``), plus the imported answers of ``annotate.imports``. All of them are
assembled shard range by shard range into one ``annotations.parquet`` (so memory stays
bounded by a shard for open_clip), beside ``skipped.parquet`` (open_clip: images that could
not be read, with the reason) and ``few_shot.parquet`` (human labels, when given).

The summary (``annotation_summary.json``) reports, where ground truth is known, the figures
the reference prints: zero-shot accuracy of annotator 0 (template 0), accuracy of the
plurality vote, the noise rate (share of samples whose true label is outside S, with S the
union of the annotators' top-1 answers) and the mean |S|, on all samples and per split.
For the synthetic protocol S is the drawn set, and the zero-shot and vote accuracies are
null because its per-class pseudo-annotators are not real annotators.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coreg.aggregate import plurality_vote
from coreg.annotate.imports import SampleIndex, import_warnings, read_few_shot_labels, read_imported_answers
from coreg.annotate.shards import OpenClipRun, ShardPlan, run_open_clip, shard_path
from coreg.annotate.simulate import simulate_vlm_annotations, simulation_frame
from coreg.annotate.synthetic import synthetic_candidates, synthetic_frame
from coreg.atomic import staged_directory, write_json
from coreg.config import RunConfig, save_config
from coreg.contracts import (
    ANNOTATIONS_FILE,
    ANNOTATIONS_SCHEMA,
    SPLITS,
    read_classes,
    read_few_shot,
    read_samples,
    write_classes,
    write_few_shot,
    write_samples,
    write_skipped,
)
from coreg.data.dataset import ImageDataset
from coreg.data.sources import load_dataset
from coreg.data.splits import split_samples
from coreg.errors import CoregError
from coreg.lineage import write_lineage

SUMMARY_FILE = "annotation_summary.json"
log = logging.getLogger(__name__)


def _rate(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def set_figures(
    sets: np.ndarray, labels: np.ndarray, zero_shot: np.ndarray | None, vote: np.ndarray | None
) -> dict[str, Any]:
    """Mean |S|, noise rate and accuracies for one group of samples (labels -1 are skipped)."""
    known = labels >= 0
    y = labels[known]
    coverage = sets[known][np.arange(len(y)), y]
    return {
        "n_samples": len(labels),
        "labelled_samples": int(known.sum()),
        "mean_set_size": _rate(sets.sum(axis=1)),
        "noise_rate": None if not len(y) else 1.0 - float(coverage.mean()),
        "zero_shot_accuracy": None if zero_shot is None else _rate(zero_shot[known] == y),
        "majority_vote_accuracy": None if vote is None else _rate(vote[known] == y),
    }


def annotation_summary(
    sets: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    zero_shot: np.ndarray | None,
    vote: np.ndarray | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Figures on all samples and on each split, plus method-specific details."""

    def pick(a: np.ndarray | None, m: np.ndarray) -> np.ndarray | None:
        return None if a is None else a[m]

    summary = set_figures(sets, labels, zero_shot, vote)
    summary["by_split"] = {
        name: set_figures(
            sets[split == name], labels[split == name], pick(zero_shot, split == name), pick(vote, split == name)
        )
        for name in SPLITS
    }
    summary.update(extra)
    return summary


def _simulate(config: RunConfig, dataset: ImageDataset, split: np.ndarray) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg = config.annotate
    sim = simulate_vlm_annotations(dataset, split, cfg)
    n, k = len(dataset), dataset.num_classes
    votes = np.zeros((n, k), dtype=np.int64)
    for answers in sim.labels:
        votes[np.arange(n), answers] += 1
    teacher = sim.teacher_logits.argmax(axis=1)
    test = (split == "test") & (dataset.labels >= 0)
    extra = {
        "method": "simulate_vlm",
        "num_annotators": cfg.num_annotators,
        "teacher": {
            "fit_samples": len(sim.teacher_indices),
            "test_accuracy": _rate(teacher[test] == dataset.labels[test]),
        },
    }
    summary = annotation_summary(votes > 0, dataset.labels, split, sim.labels[0], plurality_vote(votes), extra)
    return simulation_frame(dataset.sample_ids, sim), summary


def _synthetic(config: RunConfig, dataset: ImageDataset, split: np.ndarray) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg = config.annotate
    if (dataset.labels < 0).any():
        raise CoregError(
            f"{dataset.source}: annotate.method 'synthetic' needs the true label of every sample; "
            f"{int((dataset.labels < 0).sum())} have none"
        )
    drawn = synthetic_candidates(dataset.labels, dataset.num_classes, cfg.q, cfg.eta, cfg.seed)
    extra = {
        "method": "synthetic",
        "num_annotators": dataset.num_classes,
        "synthetic": {
            "q": cfg.q,
            "eta": cfg.eta,
            "swapped": int(drawn.swapped.sum()),
            "swap_skipped": drawn.swap_skipped,
        },
    }
    summary = annotation_summary(drawn.matrix, dataset.labels, split, None, None, extra)
    return synthetic_frame(dataset.sample_ids, drawn.matrix), summary


def compact_figures(
    size: np.ndarray, covered: np.ndarray, labels: np.ndarray, zero_shot: np.ndarray | None, vote: np.ndarray | None
) -> dict[str, Any]:
    """:func:`set_figures` from per-sample set sizes and coverage flags (no n x K matrix needed)."""
    known = labels >= 0
    y = labels[known]
    return {
        "n_samples": len(labels),
        "labelled_samples": int(known.sum()),
        "mean_set_size": _rate(size),
        "noise_rate": None if not len(y) else 1.0 - float(covered[known].mean()),
        "zero_shot_accuracy": None if zero_shot is None else _rate(zero_shot[known] == y),
        "majority_vote_accuracy": None if vote is None else _rate(vote[known] == y),
    }


class _Tally:
    """Per-sample set size, coverage, first-annotator answer and plurality vote, filled range by range."""

    def __init__(self, n: int, num_classes: int, labels: np.ndarray, first_annotator: str | None) -> None:
        self.k = num_classes
        self.labels = labels
        self.first = first_annotator
        self.size = np.zeros(n, dtype=np.int64)
        self.covered = np.zeros(n, dtype=bool)
        self.zero = np.full(n, -1, dtype=np.int64)
        self.vote = np.full(n, -1, dtype=np.int64)

    def add(self, start: int, end: int, pos: np.ndarray, answer: np.ndarray, annotator: np.ndarray) -> None:
        n = end - start
        local = pos - start
        votes = np.bincount(local * self.k + answer, minlength=n * self.k).reshape(n, self.k)
        self.size[start:end] = (votes > 0).sum(axis=1)
        y = self.labels[start:end]
        known = y >= 0
        covered = np.zeros(n, dtype=bool)
        covered[known] = votes[np.flatnonzero(known), y[known]] > 0
        self.covered[start:end] = covered
        answered = votes.sum(axis=1) > 0
        self.vote[start:end] = np.where(answered, plurality_vote(votes), -1)
        if self.first is not None:
            mine = annotator == self.first
            self.zero[pos[mine]] = answer[mine]


def _in_memory_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame[ANNOTATIONS_SCHEMA.names], schema=ANNOTATIONS_SCHEMA, preserve_index=False)


def _assemble(
    target: Path, plan: ShardPlan, clip: OpenClipRun | None, frames: list[pd.DataFrame], tally: _Tally,
    position: dict[str, int],
) -> int:
    """Write annotations.parquet range by range (open_clip shards, then in-memory rows); count rows."""
    memory = [f for f in frames if len(f)]
    ordered: list[tuple[pd.DataFrame, np.ndarray]] = []
    for frame in memory:
        pos = frame["sample_id"].map(position).to_numpy(dtype=np.int64)
        order = np.argsort(pos, kind="stable")
        ordered.append((frame.iloc[order].reset_index(drop=True), pos[order]))
    rows = 0
    with pq.ParquetWriter(target, ANNOTATIONS_SCHEMA) as writer:
        for shard in range(plan.count):
            start, end = plan.bounds(shard)
            tables = [pq.read_table(shard_path(m.directory, shard)).cast(ANNOTATIONS_SCHEMA)
                      for m in (clip.models if clip else [])]
            for frame, pos in ordered:
                lo, hi = np.searchsorted(pos, [start, end])
                if hi > lo:
                    tables.append(_in_memory_table(frame.iloc[lo:hi]))
            tables = [t for t in tables if t.num_rows]
            if not tables:
                continue
            table = pa.concat_tables(tables)
            writer.write_table(table)
            rows += table.num_rows
            ids = table.column("sample_id").to_numpy(zero_copy_only=False)
            pos = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
            tally.add(start, end, pos, table.column("label").to_numpy().astype(np.int64),
                      table.column("annotator").to_numpy(zero_copy_only=False))
    return rows


def default_work_dir(out_dir: Path) -> Path:
    """``.<name>.work`` beside the output folder: survives a crash, outside the published folder."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.work"


def run_annotate(
    config: RunConfig, out_dir: Path, *, progress: bool = True, stop_after_shards: int | None = None
) -> Path:
    """Load and split the data, annotate it, and write the annotate folder (all files or none).

    ``stop_after_shards`` is a test hook: raise :class:`coreg.annotate.shards.AnnotateInterrupted`
    after that many open_clip shards were finished in this call, as a crash would.
    """
    cfg = config.annotate
    if cfg.method == "import" and not cfg.imports:
        raise CoregError("annotate.method 'import' needs at least one entry in annotate.imports (or --import FILE)")
    full = load_dataset(config.data)
    full_split = split_samples(full.sample_ids, config.data.test_fraction, config.data.split_seed)
    dataset, split = full, full_split
    if cfg.limit is not None and cfg.limit < len(full):
        dataset, split = full.subset(np.arange(cfg.limit)), full_split[: cfg.limit]
    out_dir = Path(out_dir)
    work_dir = Path(cfg.work_dir).expanduser() if cfg.work_dir else default_work_dir(out_dir)
    plan = ShardPlan(len(dataset), cfg.shard_size)
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    frames: list[pd.DataFrame] = []
    summary: dict[str, Any] = {}
    clip: OpenClipRun | None = None
    annotators: list[str] = []
    if cfg.method in ("simulate_vlm", "synthetic"):
        method = _simulate if cfg.method == "simulate_vlm" else _synthetic
        frame, summary = method(config, dataset, split)
        frames.append(frame)
        annotators = sorted(frame["annotator"].unique())
    elif cfg.method == "open_clip":
        clip = run_open_clip(dataset, cfg, config.data, work_dir, progress=progress,
                             stop_after_shards=stop_after_shards)
        annotators = [name for m in clip.models for name in m.annotators]
    samples_index = SampleIndex.from_dataset(dataset, full)
    imported = read_imported_answers(cfg.imports, dataset.class_names, samples_index)
    for line in import_warnings(imported.report):
        log.warning("%s", line)
    clash = set(imported.frame["annotator"]) & set(annotators)
    if clash:
        raise CoregError(f"annotate.imports: annotator name {sorted(clash)[0]!r} is also a name of the "
                         f"{cfg.method} annotators; rename it (annotator column or imports[].annotator)")
    frames.append(imported.frame)
    few_shot, few_shot_report = (None, None)
    if cfg.few_shot_labels:
        few_shot, few_shot_report = read_few_shot_labels(cfg.few_shot_labels, dataset.class_names, samples_index)

    all_names = sorted(set(annotators) | set(imported.frame["annotator"]))
    skipped = clip.skipped if clip else {}
    tally = _Tally(len(dataset), dataset.num_classes, dataset.labels, all_names[0] if all_names else None)
    samples = pd.DataFrame({"sample_id": dataset.sample_ids, "split": split, "label": dataset.labels})
    with staged_directory(out_dir) as staging:
        rows = _assemble(staging / ANNOTATIONS_FILE, plan, clip, frames, tally, position)
        if rows == 0:
            raise CoregError(f"annotate: no answers at all for the {len(dataset)} samples "
                             f"(method {cfg.method!r}; every image unreadable or every import unmatched?)")
        keep = np.ones(len(dataset), dtype=bool)
        keep[list(skipped)] = False
        if cfg.method in ("open_clip", "import") or len(imported.frame):
            summary = _summary_from_tally(tally, dataset.labels, split, keep, summary)
        summary = {"source": config.data.source, **summary, "method": cfg.method,
                   "annotated_samples": len(dataset), "data_set_samples": len(full)}
        if clip is not None:
            summary["open_clip"] = _clip_summary(clip, cfg)
            summary["skipped_images"] = len(skipped)
        if cfg.imports:
            summary["imports"] = imported.report
        if few_shot_report is not None:
            summary["few_shot"] = few_shot_report
        save_config(config, staging)
        write_lineage(staging, "annotate", {"data": Path(config.data.path)} if config.data.path else {})
        write_classes(staging, dataset.class_names)
        write_samples(staging, samples)
        if clip is not None:
            write_skipped(staging, pd.DataFrame({"sample_id": [dataset.sample_ids[p] for p in sorted(skipped)],
                                                 "reason": [skipped[p] for p in sorted(skipped)]}))
        if few_shot is not None:
            write_few_shot(staging, few_shot)
        write_json(staging / SUMMARY_FILE, summary)
    if skipped:
        log.warning("annotate: %d unreadable image(s) skipped, listed in %s", len(skipped), out_dir / "skipped.parquet")
    if clip is not None:
        _clean_work_dir(work_dir, clip, owned=not cfg.work_dir)
    return out_dir


def _clean_work_dir(work_dir: Path, clip: OpenClipRun, owned: bool) -> None:
    """Delete the shards once published. The default work folder is removed whole (with shards of
    older configs); a user-chosen one only loses this run's model folders, and itself if empty."""
    if owned:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    for model in clip.models:
        shutil.rmtree(model.directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        work_dir.rmdir()


def _summary_from_tally(
    tally: _Tally, labels: np.ndarray, split: np.ndarray, keep: np.ndarray, method_summary: dict[str, Any]
) -> dict[str, Any]:
    """Figures over all sources' answers; unreadable (skipped) samples are left out."""
    def figures(mask: np.ndarray) -> dict[str, Any]:
        answered = tally.vote[mask] >= 0
        return compact_figures(tally.size[mask], tally.covered[mask], labels[mask], tally.zero[mask],
                               np.where(answered, tally.vote[mask], -1))

    out = {k: v for k, v in method_summary.items() if k not in ("by_split",)}
    out.update(figures(keep))
    out["first_annotator"] = tally.first
    out["unanswered_samples"] = int(((tally.vote < 0) & keep).sum())
    out["by_split"] = {name: figures(keep & (split == name)) for name in SPLITS}
    return out


def _clip_summary(clip: OpenClipRun, cfg: Any) -> dict[str, Any]:
    return {
        "device": clip.device,
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
        "models": [
            {
                "prefix": m.prefix,
                "annotators": len(m.annotators),
                "templates": m.templates,
                "logit_scale": m.logit_scale,
                "shards_reused": m.shards_reused,
                "seconds": m.seconds,
                "images_per_second": m.images_per_second,
            }
            for m in clip.models
        ],
    }


def preview_table(annotate_dir: Path, rows: int = 10) -> str:
    """A small text table of the first samples with their candidate sets (union of answers)."""
    annotate_dir = Path(annotate_dir)
    names = read_classes(annotate_dir)
    samples = read_samples(annotate_dir).head(rows)
    ids = samples["sample_id"].tolist()
    table = pq.read_table(annotate_dir / ANNOTATIONS_FILE, columns=["sample_id", "annotator", "label"],
                          filters=[("sample_id", "in", ids)]).to_pandas()
    few = read_few_shot(annotate_dir, len(names)).set_index("sample_id")["label"]
    lines = [f"{'sample':<28} {'truth':<12} {'answers':>7}  candidate set (votes)"]
    for sid, truth in zip(ids, samples["label"], strict=True):
        answers = table.loc[table["sample_id"] == sid, "label"].value_counts()
        cands = ", ".join(f"{names[int(k)]}({int(v)})" for k, v in answers.sort_index().items()) or "-"
        if sid in few.index:
            cands = f"[few-shot: {names[int(few[sid])]}] " + cands
        label = names[int(truth)] if truth >= 0 else "?"
        short = sid if len(sid) <= 28 else "..." + sid[-25:]
        lines.append(f"{short:<28} {label:<12} {int(answers.sum()):>7}  {cands}")
    return "\n".join(lines)
