"""Aggregate stage: per-annotator answers -> one candidate label set S per image, plus a quality report.

Rules (``AggregateConfig.rule``), all vectorised over an n x K vote matrix or mean-probability matrix:

- ``union`` (reference default): every class some annotator named as its top-1.
- ``topk``: the k classes with the highest mean probability (ties: lower class index first).
- ``ratio``: the classes among the top-k of the mean probabilities whose mean probability is
  at least ``ratio`` x the sample's maximum.
- ``min_votes``: classes named by at least ``min_votes`` annotators.

``topk`` and ``ratio`` need probabilities for every sample; without them the stage fails and
names the rule and the file. ``min_votes`` can leave a sample with an empty set: that sample
then falls back to its plurality-vote label (the class most annotators named, ties to the
lowest class index), and the summary counts these fallbacks in ``empty_set_fallbacks``.
``mean_probs`` is the mean of the probability vectors the annotators gave (null when none did).

Samples the annotate stage could not read (its ``skipped.parquet``) are dropped with their
answers and counted (``skipped_samples``); they also leave the ``samples.parquet`` this stage
writes, so training and evaluation never try to open them. Any other sample without an
answer is still an error. Few-shot human labels (annotate's ``few_shot.parquet``) replace the
sample's set by the single true label and are flagged ``few_shot`` in ``candidates.parquet``.

The quality report (``quality.json``/``quality.md``) gives, on all samples and per split: the
mean set size, the set-size histogram, each annotator's agreement with the plurality vote
and, where ground truth is known, coverage (share with the true label in S, the reference's
"partial accuracy"), the noise rate (1 - coverage) and per-annotator accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coreg.atomic import staged_directory, write_json, write_text
from coreg.config import AggregateConfig, RunConfig, save_config
from coreg.contracts import (
    ANNOTATIONS_FILE,
    SPLITS,
    read_annotations,
    read_classes,
    read_few_shot,
    read_samples,
    read_skipped,
    write_candidates,
    write_classes,
    write_samples,
)
from coreg.errors import CoregError
from coreg.lineage import write_lineage

QUALITY_JSON = "quality.json"
QUALITY_MD = "quality.md"
QUALITY_REPORT_MD = "quality_report.md"
QUALITY_REPORT_HTML = "quality_report.html"


@dataclass
class Aggregation:
    """Candidate matrix (n, K) bool, votes (n, K), mean probs (n, K; NaN rows where none) and fallbacks."""

    candidates: np.ndarray
    votes: np.ndarray
    mean_probs: np.ndarray
    fallback: np.ndarray
    sample_index: np.ndarray  # per annotation row: its sample's position
    few_shot: np.ndarray | None = None  # (n,) bool: the set is a human label


# ----------------------------------------------------------------------------- building blocks
def sample_positions(annotations: pd.DataFrame, sample_ids: Sequence[str], source: str) -> np.ndarray:
    """Position of each annotation row's sample in ``sample_ids``; unknown ids are an error."""
    index = pd.Index(list(sample_ids))
    pos = index.get_indexer(annotations["sample_id"])
    if (pos < 0).any():
        row = int(np.flatnonzero(pos < 0)[0])
        raise CoregError(
            f"{source}: row {row}: sample {annotations['sample_id'].iloc[row]!r} is not in samples.parquet"
        )
    return pos.astype(np.int64)


def vote_matrix(sample_index: np.ndarray, labels: np.ndarray, num_samples: int, num_classes: int) -> np.ndarray:
    """Counts (n, K): how many annotators named class j for sample i."""
    flat = sample_index * num_classes + np.asarray(labels, dtype=np.int64)
    return np.bincount(flat, minlength=num_samples * num_classes).reshape(num_samples, num_classes)


def plurality_vote(
    votes: np.ndarray | pd.DataFrame, num_classes: int | None = None, n_samples: int | None = None
) -> np.ndarray:
    """The most-named class per sample; ties go to the lowest class index (argmax order).

    ``votes`` is an (n, K) vote matrix, or annotation rows with a ``_row`` column (the
    sample's position) and a ``label`` column, plus ``num_classes`` and ``n_samples``.
    A sample without any vote gets class 0.
    """
    if isinstance(votes, pd.DataFrame):
        if num_classes is None or n_samples is None:
            raise ValueError("plurality_vote on annotation rows needs num_classes and n_samples")
        votes = vote_matrix(votes["_row"].to_numpy(dtype=np.int64), votes["label"].to_numpy(), n_samples, num_classes)
    return np.asarray(votes).argmax(axis=1)


def mean_probabilities(sample_index: np.ndarray, probs: pd.Series, num_samples: int, num_classes: int) -> np.ndarray:
    """Mean of the given probability vectors per sample (n, K) float32; rows with none are NaN."""
    given = probs.notna().to_numpy()
    sums = np.zeros((num_samples, num_classes), dtype=np.float64)
    counts = np.bincount(sample_index[given], minlength=num_samples)
    if given.any():
        stacked = np.stack(probs[given].to_numpy()).astype(np.float64)
        np.add.at(sums, sample_index[given], stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
    mean[counts == 0] = np.nan
    return mean.astype(np.float32)


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean (n, K) mask of each row's k highest scores (stable: lower index wins ties)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def candidate_sets(
    votes: np.ndarray, mean_probs: np.ndarray, cfg: AggregateConfig, source: str, exempt: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the rule; return the candidate matrix and the mask of empty-set fallbacks.

    ``exempt`` marks samples whose set is replaced afterwards (few-shot labels): they need no probs.
    """
    if cfg.rule in ("topk", "ratio"):
        missing = np.isnan(mean_probs).any(axis=1)
        if exempt is not None:
            missing &= ~exempt
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise CoregError(
                f"{source}: rule {cfg.rule!r} needs the annotators' probs, but sample #{first} has none; "
                "use rule 'union' or 'min_votes'"
            )
    if cfg.rule == "union":
        sets = votes > 0
    elif cfg.rule == "min_votes":
        sets = votes >= cfg.min_votes
    elif cfg.rule == "topk":
        sets = top_k_mask(mean_probs, cfg.k)
    else:
        threshold = cfg.ratio * mean_probs.max(axis=1, keepdims=True)
        sets = top_k_mask(mean_probs, cfg.k) & (mean_probs >= threshold)
    empty = ~sets.any(axis=1)
    sets[np.flatnonzero(empty), plurality_vote(votes)[empty]] = True
    return sets, empty


def aggregate_annotations(
    annotations: pd.DataFrame,
    sample_ids: Sequence[str],
    num_classes: int,
    cfg: AggregateConfig,
    source: str = ANNOTATIONS_FILE,
    few_shot_labels: np.ndarray | None = None,
) -> Aggregation:
    """Candidate sets for ``sample_ids`` (in that order); every sample needs at least one annotation.

    ``few_shot_labels`` (n,), -1 where unknown: human labels that become single-label sets (and
    need no annotation).
    """
    n = len(sample_ids)
    human = np.full(n, -1, dtype=np.int64) if few_shot_labels is None else np.asarray(few_shot_labels, np.int64)
    labelled = human >= 0
    pos = sample_positions(annotations, sample_ids, source)
    votes = vote_matrix(pos, annotations["label"].to_numpy(), n, num_classes)
    unanswered = (votes.sum(axis=1) == 0) & ~labelled
    if unanswered.any():
        raise CoregError(f"{source}: sample {sample_ids[int(np.flatnonzero(unanswered)[0])]!r} has no annotation")
    mean = mean_probabilities(pos, annotations["probs"], n, num_classes)
    sets, fallback = candidate_sets(votes, mean, cfg, source, exempt=labelled)
    if labelled.any():
        rows = np.flatnonzero(labelled)
        sets[rows] = False
        sets[rows, human[rows]] = True
        fallback[rows] = False
    return Aggregation(sets, votes, mean, fallback, pos, labelled)


def candidates_frame(sample_ids: Sequence[str], agg: Aggregation) -> pd.DataFrame:
    """The candidates contract: sorted int32 label lists and mean probs (null when none)."""
    _, cols = np.nonzero(agg.candidates)  # row-major: labels come out sorted within a row
    bounds = np.cumsum(agg.candidates.sum(axis=1))[:-1]
    lists = np.split(cols.astype(np.int32), bounds)
    has = ~np.isnan(agg.mean_probs).any(axis=1)
    mean = [agg.mean_probs[i] if has[i] else None for i in range(len(sample_ids))]
    few = np.zeros(len(sample_ids), dtype=bool) if agg.few_shot is None else agg.few_shot
    return pd.DataFrame({"sample_id": list(sample_ids), "candidates": lists, "mean_probs": mean, "few_shot": few})


# ----------------------------------------------------------------------------- quality summary
def _rate(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _section(agg: Aggregation, annotations: pd.DataFrame, labels: np.ndarray, keep: np.ndarray) -> dict[str, Any]:
    """Figures for the samples in ``keep`` (a boolean mask over samples)."""
    sets = agg.candidates[keep]
    sizes = sets.sum(axis=1)
    known = labels[keep] >= 0
    y = labels[keep][known]
    plural = plurality_vote(agg.votes)
    coverage = _rate(sets[known][np.arange(len(y)), y])
    hist = np.bincount(sizes, minlength=agg.candidates.shape[1] + 1) if len(sizes) else np.zeros(1, dtype=np.int64)
    out: dict[str, Any] = {
        "n_samples": int(keep.sum()),
        "labelled_samples": int(known.sum()),
        "mean_set_size": _rate(sizes),
        "set_size_histogram": {str(s): int(c) for s, c in enumerate(hist) if c},
        "empty_set_fallbacks": int(agg.fallback[keep].sum()),
        "coverage": coverage,
        "noise_rate": None if coverage is None else 1.0 - coverage,
        "plurality_accuracy": _rate(plural[keep][known] == y),
        "annotators": _annotator_table(agg, annotations, labels, plural, keep),
    }
    return out


def _annotator_table(
    agg: Aggregation, annotations: pd.DataFrame, labels: np.ndarray, plural: np.ndarray, keep: np.ndarray
) -> dict[str, dict[str, Any]]:
    rows = keep[agg.sample_index]
    pos = agg.sample_index[rows]
    answer = annotations["label"].to_numpy()[rows]
    truth = labels[pos]
    frame = pd.DataFrame(
        {
            "annotator": annotations["annotator"].to_numpy()[rows],
            "agree": answer == plural[pos],
            "correct": np.where(truth >= 0, answer == truth, np.nan),
        }
    )
    grouped = frame.groupby("annotator", sort=True)
    table = pd.DataFrame(
        {"answered": grouped.size(), "agreement": grouped["agree"].mean(), "accuracy": grouped["correct"].mean()}
    )
    return {
        str(name): {
            "answered": int(row.answered),
            "agreement": float(row.agreement),
            "accuracy": None if pd.isna(row.accuracy) else float(row.accuracy),
        }
        for name, row in table.iterrows()
    }


def quality_summary(
    agg: Aggregation, annotations: pd.DataFrame, samples: pd.DataFrame, cfg: AggregateConfig
) -> dict[str, Any]:
    """Rule, sizes, coverage and annotator figures on all samples and on each split."""
    labels = samples["label"].to_numpy(dtype=np.int64)
    split = samples["split"].to_numpy()
    everything = np.ones(len(samples), dtype=bool)
    return {
        "rule": cfg.rule,
        "rule_params": {"k": cfg.k, "ratio": cfg.ratio, "min_votes": cfg.min_votes},
        "num_classes": int(agg.candidates.shape[1]),
        "num_annotators": int(annotations["annotator"].nunique()),
        "all": _section(agg, annotations, labels, everything),
        "splits": {name: _section(agg, annotations, labels, split == name) for name in SPLITS},
    }


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}"


def quality_markdown(summary: dict[str, Any]) -> str:
    """A short human-readable report: one row per split, then one per annotator (all samples)."""
    lines = [
        f"# Candidate-set quality (rule: {summary['rule']})",
        "",
        "| samples | n | mean \\|S\\| | coverage | noise rate | plurality acc. | fallbacks |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = [("all", summary["all"]), *summary["splits"].items()]
    for name, sec in sections:
        lines.append(
            f"| {name} | {sec['n_samples']} | {_fmt(sec['mean_set_size'], pct=False)} | {_fmt(sec['coverage'])} | "
            f"{_fmt(sec['noise_rate'])} | {_fmt(sec['plurality_accuracy'])} | {sec['empty_set_fallbacks']} |"
        )
    lines += ["", "| annotator | answered | agreement with plurality | accuracy |", "|---|---|---|---|"]
    for name, row in summary["all"]["annotators"].items():
        lines.append(f"| {name} | {row['answered']} | {_fmt(row['agreement'])} | {_fmt(row['accuracy'])} |")
    if summary.get("skipped_samples"):
        lines += ["", f"{summary['skipped_samples']} sample(s) dropped: their images could not be read "
                  "(listed in the annotate folder's skipped.parquet)."]
    if summary.get("few_shot_samples"):
        lines += ["", f"{summary['few_shot_samples']} sample(s) carry a few-shot human label (single-label set)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- stage
def drop_skipped(
    samples: pd.DataFrame, annotations: pd.DataFrame, skipped: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Remove the samples annotate could not read (and any answers they got); return how many."""
    if skipped.empty:
        return samples, annotations, 0
    gone = set(skipped["sample_id"])
    keep = ~samples["sample_id"].isin(gone)
    samples = samples[keep].reset_index(drop=True)
    annotations = annotations[~annotations["sample_id"].isin(gone)].reset_index(drop=True)
    return samples, annotations, int((~keep).sum())


def run_aggregate(config: RunConfig, annotations_dir: Path, out_dir: Path) -> Path:
    """Read an annotate folder, build candidate sets, and write the aggregate folder atomically."""
    annotations_dir, out_dir = Path(annotations_dir), Path(out_dir)
    class_names = read_classes(annotations_dir)
    samples = read_samples(annotations_dir)
    annotations = read_annotations(annotations_dir, len(class_names))
    skipped = read_skipped(annotations_dir)
    few = read_few_shot(annotations_dir, len(class_names))
    samples, annotations, n_skipped = drop_skipped(samples, annotations, skipped)
    source = str(annotations_dir / ANNOTATIONS_FILE)
    sample_ids = samples["sample_id"].tolist()
    human = few.set_index("sample_id")["label"].reindex(sample_ids).fillna(-1).to_numpy(dtype=np.int64)
    agg = aggregate_annotations(annotations, sample_ids, len(class_names), config.aggregate, source,
                                few_shot_labels=human)
    summary = quality_summary(agg, annotations, samples, config.aggregate)
    summary["skipped_samples"] = n_skipped
    summary["skipped_examples"] = skipped[["sample_id", "reason"]].head(10).to_dict("records")
    summary["few_shot_samples"] = int((human >= 0).sum())
    report = None
    if config.aggregate.report:
        from coreg.report import build_quality_report

        report = build_quality_report(config, class_names, samples, annotations, agg, summary)
    with staged_directory(out_dir) as staging:
        save_config(config, staging)
        write_lineage(staging, "aggregate", {"annotations": annotations_dir})
        write_classes(staging, class_names)
        write_samples(staging, samples)
        write_candidates(staging, candidates_frame(sample_ids, agg))
        write_json(staging / QUALITY_JSON, summary)
        write_text(staging / QUALITY_MD, quality_markdown(summary))
        if report is not None:
            write_text(staging / QUALITY_REPORT_MD, report.markdown)
            write_text(staging / QUALITY_REPORT_HTML, report.html)
    return out_dir
