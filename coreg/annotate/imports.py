"""Imported answers of other VLMs (JSONL or CSV) and few-shot human labels.

Rules, chosen so that a messy export never silently changes the labels:

- A row names its sample by ``sample_id`` or, when that is empty or absent, by image path
  (matched as a sample id, then as the absolute path of a file-based data set; relative
  paths are resolved against the answers file's folder).
- Rows naming no sample of the data set are counted per annotator (``unknown_samples``, with
  examples) and left out; a file none of whose rows names a sample is an error, because
  that is a wrong id column rather than a few stray rows. Rows naming a sample of the data
  set that a ``--limit`` preview left out are counted as ``outside_limit``.
- The answer is the ``label`` column (a class name or index) when the row has one, else the
  free-text ``answer`` column, mapped by :class:`coreg.annotate.answers.AnswerMapper`.
  Unmapped answers are counted per annotator by reason (``no_match``, ``ambiguous``,
  ``empty``) with examples; a file where no answer maps is an error.
- Duplicate (sample, annotator) answers: the last one wins (file order, then row order);
  the replaced ones are counted as ``duplicates``.
- ``score`` is optional; when given it must be a number in [0, 1] (stored as ``probability``).

Few-shot labels (sample, class name) are human labels: an unknown class name or two
different labels for one sample are errors naming the row, unknown ids are counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from coreg.annotate.answers import MATCH_REASONS, AnswerMapper
from coreg.config import ImportConfig
from coreg.data.dataset import ImageDataset
from coreg.errors import CoregError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
EXAMPLES = 5


@dataclass
class SampleIndex:
    """How rows find their sample: ids and absolute paths of the annotated samples.

    ``all_ids`` holds every id of the data set, so ids a ``limit`` left out are told apart
    from ids the data set does not have.
    """

    ids: list[str]
    paths: list[str] | None
    all_ids: set[str] = field(default_factory=set)

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, full: ImageDataset | None = None) -> SampleIndex:
        return cls(list(dataset.sample_ids), dataset.paths, set((full or dataset).sample_ids))

    def __post_init__(self) -> None:
        self._by_id = {sid: i for i, sid in enumerate(self.ids)}
        self._by_path = {p: i for i, p in enumerate(self.paths or [])}

    def locate(self, sample_id: str, path: str, base: Path) -> tuple[int, str]:
        """(position or -1, the key used); ``path`` is tried when ``sample_id`` is empty."""
        if sample_id:
            return self._by_id.get(sample_id, -1), sample_id
        if not path:
            return -1, ""
        if path in self._by_id:
            return self._by_id[path], path
        p = Path(path).expanduser()
        resolved = str(p if p.is_absolute() else (base / p).resolve())
        return self._by_path.get(resolved, -1), path

    def known(self, key: str) -> bool:
        return key in self.all_ids


# ----------------------------------------------------------------------------- reading files
def read_rows(path: Path, field_name: str) -> pd.DataFrame:
    """A JSONL or CSV file as a frame of strings (missing cells ''), with errors naming the line."""
    if not path.is_file():
        raise CoregError(f"{path}: file not found ({field_name})")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records: list[dict[str, Any]] = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CoregError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise CoregError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
                records.append({str(k): _cell(v) for k, v in record.items()})
        df = pd.DataFrame.from_records(records)
    elif suffix in CSV_SUFFIXES:
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, sep=CSV_SUFFIXES[suffix])
        except Exception as err:  # pandas raises many types for a malformed file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CoregError(f"{path}: cannot read CSV ({reason})") from None
    else:
        raise CoregError(f"{path}: {field_name} must be .jsonl, .ndjson, .csv or .tsv, got {suffix or 'no suffix'!r}")
    if df.empty:
        raise CoregError(f"{path}: has no rows ({field_name})")
    return df.fillna("").astype(str)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value).strip()


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), "", dtype=object)
    return df[name].astype(str).str.strip().to_numpy(dtype=object)


# ----------------------------------------------------------------------------- imported answers
@dataclass
class ImportedAnswers:
    """Answer rows in the annotations contract and the per-file, per-annotator report."""

    frame: pd.DataFrame
    report: list[dict[str, Any]]


def _empty_stats() -> dict[str, Any]:
    stats: dict[str, Any] = {
        "rows": 0,
        "used": 0,
        "duplicates": 0,
        "unknown_samples": 0,
        "outside_limit": 0,
        "unmatched": 0,
    }
    stats.update({f"unmatched_{r}": 0 for r in MATCH_REASONS if r not in ("exact", "phrase")})
    stats["unknown_sample_examples"] = []
    stats["unmatched_examples"] = []
    return stats


def _label_of(value: str, mapper: AnswerMapper) -> tuple[int | None, str]:
    """A ``label`` cell: a class index or a class name (mapped like free text)."""
    try:
        index = int(value)
    except ValueError:
        match = mapper.match(value)
        return match.label, match.reason
    return (index, "exact") if 0 <= index < mapper.num_classes else (None, "no_match")


def read_imported_answers(
    configs: Sequence[ImportConfig], class_names: Sequence[str], samples: SampleIndex
) -> ImportedAnswers:
    """Read every import file into annotation rows (see the module doc for the rules)."""
    frames: list[pd.DataFrame] = []
    report: list[dict[str, Any]] = []
    for number, cfg in enumerate(configs):
        field_name = f"annotate.imports[{number}]"
        path = Path(cfg.path).expanduser()
        df = read_rows(path, f"{field_name}.path")
        mapper = AnswerMapper(class_names, cfg.synonyms, f"{field_name}.synonyms")
        frame, file_report = _read_one(df, cfg, path, mapper, samples, field_name)
        frame["_file"] = number
        frames.append(frame)
        report.append(file_report)
    if not frames:
        return ImportedAnswers(_answer_frame([], [], [], []), [])
    rows = pd.concat(frames, ignore_index=True)
    dup = rows.duplicated(["sample_id", "annotator"], keep="last").to_numpy()
    if dup.any():
        # Count replaced answers under the file and annotator that gave them.
        for (file_no, name), count in rows[dup].groupby(["_file", "annotator"]).size().items():
            stats = report[int(file_no)]["annotators"][name]
            stats["duplicates"] += int(count)
            stats["used"] -= int(count)
        rows = rows[~dup]
    return ImportedAnswers(rows.drop(columns="_file").reset_index(drop=True), report)


def _read_one(
    df: pd.DataFrame, cfg: ImportConfig, path: Path, mapper: AnswerMapper, samples: SampleIndex, field_name: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    has_id, has_path = cfg.id_column in df.columns, cfg.path_column in df.columns
    if not has_id and not has_path:
        raise CoregError(f"{path}: needs a {cfg.id_column!r} or {cfg.path_column!r} column "
                         f"({field_name}.id_column / path_column); columns are {', '.join(map(str, df.columns))}")
    if cfg.label_column not in df.columns and cfg.answer_column not in df.columns:
        raise CoregError(f"{path}: needs an {cfg.answer_column!r} or {cfg.label_column!r} column "
                         f"({field_name}.answer_column / label_column); columns are {', '.join(map(str, df.columns))}")
    ids, paths = _column(df, cfg.id_column), _column(df, cfg.path_column)
    names = _column(df, cfg.annotator_column)
    default_name = cfg.annotator or path.stem
    names = np.where(names == "", default_name, names)
    labels_text, answers = _column(df, cfg.label_column), _column(df, cfg.answer_column)
    scores = _column(df, cfg.score_column)
    per_annotator: dict[str, dict[str, Any]] = {}
    out_ids: list[str] = []
    out_names: list[str] = []
    out_labels: list[int] = []
    out_scores: list[float] = []
    for row in range(len(df)):
        name = str(names[row])
        stats = per_annotator.setdefault(name, _empty_stats())
        stats["rows"] += 1
        pos, key = samples.locate(str(ids[row]), str(paths[row]), path.parent)
        if pos < 0:
            if key and samples.known(key):
                stats["outside_limit"] += 1
            else:
                stats["unknown_samples"] += 1
                if len(stats["unknown_sample_examples"]) < EXAMPLES:
                    stats["unknown_sample_examples"].append(key)
            continue
        text = str(labels_text[row]) or str(answers[row])
        label, reason = _label_of(text, mapper) if labels_text[row] else _match(text, mapper)
        if label is None:
            stats["unmatched"] += 1
            stats[f"unmatched_{reason}"] += 1
            if len(stats["unmatched_examples"]) < EXAMPLES:
                stats["unmatched_examples"].append(text)
            continue
        out_ids.append(samples.ids[pos])
        out_names.append(name)
        out_labels.append(label)
        out_scores.append(_score(str(scores[row]), path, row, cfg.score_column))
        stats["used"] += 1
    total = {k: sum(s[k] for s in per_annotator.values()) for k in ("rows", "unknown_samples", "outside_limit")}
    if total["unknown_samples"] == total["rows"]:
        example = next(iter(per_annotator.values()))["unknown_sample_examples"][:1]
        raise CoregError(f"{path}: none of its {total['rows']} rows names a sample of the data set "
                         f"(e.g. {example[0] if example else ''!r}); check {field_name}.id_column / path_column")
    if not out_ids and total["outside_limit"] == 0:
        raise CoregError(f"{path}: none of its answers matches a class name; add {field_name}.synonyms "
                         f"(e.g. an answer was {_first_unmatched(per_annotator)!r})")
    frame = _answer_frame(out_ids, out_names, out_labels, out_scores)
    return frame, {"path": str(path), "rows": len(df), "annotators": per_annotator}


def _match(text: str, mapper: AnswerMapper) -> tuple[int | None, str]:
    match = mapper.match(text)
    return match.label, match.reason


def _first_unmatched(per_annotator: dict[str, dict[str, Any]]) -> str:
    for stats in per_annotator.values():
        if stats["unmatched_examples"]:
            return str(stats["unmatched_examples"][0])
    return ""


def _score(text: str, path: Path, row: int, column: str) -> float:
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise CoregError(f"{path}: row {row}: {column} {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise CoregError(f"{path}: row {row}: {column} {value} is outside [0, 1]")
    return value


def _answer_frame(ids: list[str], names: list[str], labels: list[int], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": pd.Series(ids, dtype=object),
            "annotator": pd.Series(names, dtype=object),
            "label": np.asarray(labels, dtype=np.int32),
            "probability": np.asarray(scores, dtype=np.float32),
            "probs": pd.Series([None] * len(ids), dtype=object),
        }
    )


def import_warnings(report: list[dict[str, Any]]) -> list[str]:
    """One line per annotator with unmatched answers, unknown ids or duplicates (for the log)."""
    lines = []
    for entry in report:
        for name, s in entry["annotators"].items():
            issues = [f"{s[k]} {k.replace('_', ' ')}" for k in ("unmatched", "unknown_samples", "duplicates") if s[k]]
            if issues:
                lines.append(f"{entry['path']}: annotator {name!r}: {', '.join(issues)} (of {s['rows']} rows)")
    return lines


# ----------------------------------------------------------------------------- few-shot labels
def read_few_shot_labels(
    path_text: str, class_names: Sequence[str], samples: SampleIndex
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Human labels as (sample_id, label index) plus counts; see the module doc for the rules."""
    path = Path(path_text).expanduser()
    df = read_rows(path, "annotate.few_shot_labels")
    for column in ("label",):
        if column not in df.columns:
            raise CoregError(f"{path}: needs a 'label' column (class name); columns are {', '.join(df.columns)}")
    if "sample_id" not in df.columns and "path" not in df.columns:
        raise CoregError(f"{path}: needs a 'sample_id' or 'path' column; columns are {', '.join(df.columns)}")
    ids, paths, labels = _column(df, "sample_id"), _column(df, "path"), _column(df, "label")
    index = {name: i for i, name in enumerate(class_names)}
    folded: dict[str, int] = {}
    for name, i in index.items():
        folded.setdefault(name.casefold(), i)
    chosen: dict[str, int] = {}
    unknown: list[str] = []
    outside = 0
    for row in range(len(df)):
        text = str(labels[row])
        label = index.get(text, folded.get(text.casefold()))
        if label is None:
            raise CoregError(f"{path}: row {row}: label {text!r} is not a class name")
        pos, key = samples.locate(str(ids[row]), str(paths[row]), path.parent)
        if pos < 0:
            if key and samples.known(key):
                outside += 1
            else:
                unknown.append(key)
            continue
        sid = samples.ids[pos]
        if sid in chosen and chosen[sid] != label:
            raise CoregError(f"{path}: row {row}: sample {sid!r} is labelled both "
                             f"{class_names[chosen[sid]]!r} and {class_names[label]!r}")
        chosen[sid] = label
    if len(unknown) == len(df):
        raise CoregError(f"{path}: none of its {len(df)} rows names a sample of the data set "
                         f"(e.g. {unknown[0]!r}); use sample ids as in samples.parquet or image paths")
    frame = pd.DataFrame({"sample_id": list(chosen), "label": np.asarray(list(chosen.values()), dtype=np.int64)})
    report = {"path": str(path), "rows": len(df), "used": len(chosen), "unknown_samples": len(unknown),
              "unknown_sample_examples": unknown[:EXAMPLES], "outside_limit": outside}
    return frame, report
