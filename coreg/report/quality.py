"""Label-quality report of the aggregate stage: Markdown plus one self-contained HTML page.

Its job is to tell a user, before any GPU hour is spent on training, how usable the noisy
candidate sets are: are the classes balanced, how big are the sets, did every annotator
answer, do the annotators agree, which classes get confused with which, what do the sets
look like on real images, and, when ground truth is known, the zero-shot accuracy, the
partial accuracy (true label in S) and the noise rate per class.

Plots are matplotlib PNGs embedded as base64 ``<img>`` tags, so the HTML file can be mailed
or attached to a run without its folder. The Markdown file holds the same tables (no
images; it points at the HTML page). Costly parts are capped: pairwise agreement uses at
most :data:`AGREEMENT_SAMPLES` samples (seeded), the agreement heatmap at most
:data:`MAX_HEATMAP` annotators and the example grid at most :data:`MAX_GRID_CLASSES` classes.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from coreg.config import RunConfig
from coreg.errors import CoregError

log = logging.getLogger(__name__)

AGREEMENT_SAMPLES = 20_000
MAX_HEATMAP = 60
MAX_GRID_CLASSES = 30
TOP_PAIRS = 10
TOP_CONFLICTS = 10

SECTIONS = (
    ("overview", "Overview"),
    ("class-balance", "Class balance of the candidate sets"),
    ("set-sizes", "Set-size histogram"),
    ("annotator-coverage", "Per-annotator coverage"),
    ("agreement", "Agreement between annotators"),
    ("conflicts", "Conflicts"),
    ("ambiguous-classes", "Most ambiguous classes"),
    ("examples", "Example images per class"),
    ("ground-truth", "Accuracy against ground truth"),
)


@dataclass
class QualityReport:
    """The rendered report and the figures it holds (name -> PNG bytes)."""

    markdown: str
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Doc:
    """Parallel Markdown and HTML builders, so both files always carry the same sections."""

    md: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def section(self, anchor: str, title: str) -> None:
        self.md += ["", f"## {title}", ""]
        self.body.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def text(self, text: str) -> None:
        self.md += [text, ""]
        self.body.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for row in rows:
            self.md.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        self.md.append("")
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        self.body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, name: str, fig: Any, alt: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        self.figures[name] = data
        encoded = base64.b64encode(data).decode("ascii")
        self.body.append(f'<figure><img alt="{html.escape(alt)}" data-figure="{name}" '
                         f'src="data:image/png;base64,{encoded}"/><figcaption>{html.escape(alt)}</figcaption></figure>')
        self.md += [f"*Figure: {alt} (in quality_report.html).*", ""]


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def build_quality_report(
    config: RunConfig, class_names: list[str], samples: pd.DataFrame, annotations: pd.DataFrame, agg: Any,
    summary: dict[str, Any],
) -> QualityReport:
    """Render the report from the aggregation (candidate matrix, votes) and the raw answers."""
    plt = _plt()
    k = len(class_names)
    n = len(samples)
    sets = agg.candidates
    truth = samples["label"].to_numpy(dtype=np.int64)
    known = truth >= 0
    names = sorted(annotations["annotator"].unique().tolist())
    answer_matrix = _answer_matrix(annotations, agg.sample_index, names, n)
    doc = _Doc()

    # Overview -------------------------------------------------------------------------------
    doc.section(*SECTIONS[0])
    everything = summary["all"]
    overview = [
        ["samples", n],
        ["classes", k],
        ["annotators", len(names)],
        ["aggregation rule", summary["rule"]],
        ["mean |S|", f"{everything['mean_set_size']:.2f}" if everything["mean_set_size"] is not None else "n/a"],
        ["partial accuracy (true label in S)", _pct(everything["coverage"])],
        ["noise rate", _pct(everything["noise_rate"])],
        ["plurality-vote accuracy", _pct(everything["plurality_accuracy"])],
        ["empty-set fallbacks", everything["empty_set_fallbacks"]],
        ["skipped (unreadable) samples", summary.get("skipped_samples", 0)],
        ["few-shot (human-labelled) samples", summary.get("few_shot_samples", 0)],
    ]
    doc.table(["figure", "value"], overview)

    # Class balance --------------------------------------------------------------------------
    doc.section(*SECTIONS[1])
    in_sets = sets.sum(axis=0)
    weighted = (sets / np.maximum(sets.sum(axis=1, keepdims=True), 1)).sum(axis=0)
    plural = agg.votes.argmax(axis=1)
    plural_count = np.bincount(plural[agg.votes.sum(axis=1) > 0], minlength=k)
    doc.text("How often each class appears in a candidate set, its share when each set counts 1 "
             "(split evenly among its labels), and how often it wins the plurality vote.")
    doc.table(["class", "in sets", "weighted share", "plurality wins"],
              [[class_names[c], int(in_sets[c]), _pct(weighted[c] / max(n, 1)), int(plural_count[c])]
               for c in range(k)])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * k + 2), 3))
    ax.bar(range(k), in_sets, color="#4c72b0")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("sets containing the class")
    doc.figure("class_balance", fig, "class balance of the candidate sets")

    # Set sizes ------------------------------------------------------------------------------
    doc.section(*SECTIONS[2])
    sizes = sets.sum(axis=1)
    hist = np.bincount(sizes, minlength=2)
    doc.table(["|S|", "samples", "share"], [[s, int(c), _pct(c / max(n, 1))] for s, c in enumerate(hist) if c])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(hist)), hist, color="#55a868")
    ax.set_xlabel("|S|")
    ax.set_ylabel("samples")
    doc.figure("set_sizes", fig, "set-size histogram")

    # Annotator coverage ---------------------------------------------------------------------
    doc.section(*SECTIONS[3])
    answered = (answer_matrix >= 0).sum(axis=1)
    doc.text("Share of the samples each annotator answered (a missing answer is an unmatched imported "
             "answer, an id the import did not cover, or a sample only others labelled).")
    stats = summary["all"]["annotators"]
    doc.table(["annotator", "answered", "coverage", "agreement with plurality", "accuracy"],
              [[a, int(answered[i]), _pct(answered[i] / max(n, 1)), _pct(stats.get(a, {}).get("agreement")),
                _pct(stats.get(a, {}).get("accuracy"))] for i, a in enumerate(names)])
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(names) + 2), 3))
    ax.bar(range(len(names)), answered / max(n, 1), color="#8172b2")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("coverage")
    doc.figure("annotator_coverage", fig, "per-annotator coverage")

    # Agreement ------------------------------------------------------------------------------
    doc.section(*SECTIONS[4])
    agreement, used = _pairwise_agreement(answer_matrix)
    off = agreement[~np.eye(len(names), dtype=bool)] if len(names) > 1 else np.array([])
    off = off[~np.isnan(off)]
    doc.text(f"Share of samples on which two annotators give the same answer, over the samples both answered "
             f"({used} samples used). Mean pairwise agreement: {_pct(float(off.mean()) if len(off) else None)}; "
             f"lowest: {_pct(float(off.min()) if len(off) else None)}.")
    if 1 < len(names) <= MAX_HEATMAP:
        fig, ax = plt.subplots(figsize=(min(12, 0.22 * len(names) + 3), min(11, 0.22 * len(names) + 2.5)))
        im = ax.imshow(agreement, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_yticks(range(len(names)), names, fontsize=5)
        fig.colorbar(im, ax=ax, fraction=0.046)
        doc.figure("agreement", fig, "pairwise agreement between annotators")
    elif len(names) > MAX_HEATMAP:
        doc.text(f"{len(names)} annotators: heatmap left out (more than {MAX_HEATMAP}).")

    # Conflicts ------------------------------------------------------------------------------
    doc.section(*SECTIONS[5])
    votes = agg.votes
    total = votes.sum(axis=1)
    distinct = (votes > 0).sum(axis=1)
    conflict = distinct > 1
    share = np.where(total > 0, votes.max(axis=1) / np.maximum(total, 1), 1.0)
    doc.text(f"{int(conflict.sum())} of {n} samples ({_pct(conflict.mean() if n else None)}) received more than one "
             "distinct answer. Least agreed samples (lowest share of the top answer):")
    order = np.argsort(share, kind="stable")[:TOP_CONFLICTS]
    ids = samples["sample_id"].to_numpy()
    doc.table(["sample", "top-answer share", "answers (votes)"],
              [[ids[i], _pct(share[i]), ", ".join(f"{class_names[c]} ({votes[i, c]})"
                                                  for c in np.flatnonzero(votes[i]))] for i in order if conflict[i]])

    # Ambiguous class pairs ------------------------------------------------------------------
    doc.section(*SECTIONS[6])
    co = sets.T.astype(np.int64) @ sets.astype(np.int64)
    pairs = [(int(co[a, b]), a, b) for a in range(k) for b in range(a + 1, k) if co[a, b]]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    doc.text("Class pairs that occur together in candidate sets most often (Jaccard = together / either).")
    doc.table(["class A", "class B", "sets with both", "Jaccard"],
              [[class_names[a], class_names[b], c, f"{c / max(1, in_sets[a] + in_sets[b] - c):.2f}"]
               for c, a, b in pairs[:TOP_PAIRS]])
    if k <= 60:
        fig, ax = plt.subplots(figsize=(min(10, 0.3 * k + 3), min(9, 0.3 * k + 2.5)))
        norm = co / np.maximum(np.diag(co)[:, None], 1)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(k), class_names, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
        doc.figure("cooccurrence", fig, "co-occurrence of classes in candidate sets (row-normalised)")

    # Examples -------------------------------------------------------------------------------
    doc.section(*SECTIONS[7])
    _examples(doc, config, class_names, samples, sets, plural, truth)

    # Ground truth ---------------------------------------------------------------------------
    doc.section(*SECTIONS[8])
    if not known.any():
        doc.text("No ground truth is known for these samples: accuracy, partial accuracy and noise rate "
                 "cannot be computed.")
    else:
        first = names[0] if names else None
        zero = answer_matrix[0] if names else np.full(n, -1)
        covered = sets[np.flatnonzero(known), truth[known]]
        doc.text(f"Zero-shot accuracy uses the first annotator ({first}); partial accuracy is the share of "
                 "samples whose true label is in S; noise rate = 1 - partial accuracy. Few-shot samples count "
                 "with their human label.")
        rows = []
        zs_all, pa_all = [], []
        for c in range(k):
            mine = known & (truth == c)
            if not mine.any():
                rows.append([class_names[c], 0, "n/a", "n/a", "n/a"])
                zs_all.append(np.nan)
                pa_all.append(np.nan)
                continue
            zs = float((zero[mine] == c).mean())
            pa = float(sets[np.flatnonzero(mine), c].mean())
            zs_all.append(zs)
            pa_all.append(pa)
            rows.append([class_names[c], int(mine.sum()), _pct(zs), _pct(pa), _pct(1 - pa)])
        rows.append(["all", int(known.sum()), _pct(float((zero[known] == truth[known]).mean())),
                     _pct(float(covered.mean())), _pct(1 - float(covered.mean()))])
        doc.table(["class", "labelled samples", "zero-shot accuracy", "partial accuracy", "noise rate"], rows)
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * k + 2), 3))
        x = np.arange(k)
        ax.bar(x - 0.2, zs_all, width=0.4, label="zero-shot accuracy", color="#c44e52")
        ax.bar(x + 0.2, pa_all, width=0.4, label="partial accuracy", color="#4c72b0")
        ax.set_xticks(x, class_names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        doc.figure("ground_truth", fig, "zero-shot and partial accuracy per class")

    title = f"Label-quality report ({n} samples, {k} classes, rule {summary['rule']})"
    markdown = "\n".join([f"# {title}", "", "Figures: see quality_report.html in the same folder.", *doc.md]) + "\n"
    page = _HTML.format(title=html.escape(title), toc="".join(
        f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in SECTIONS), body="\n".join(doc.body))
    return QualityReport(markdown, page, doc.figures)


def _answer_matrix(annotations: pd.DataFrame, sample_index: np.ndarray, names: list[str], n: int) -> np.ndarray:
    """(M, n) int32 answers of each annotator (sorted names), -1 where it gave none."""
    out = np.full((len(names), n), -1, dtype=np.int32)
    if len(names):
        code = pd.Index(names).get_indexer(annotations["annotator"])
        out[code, sample_index] = annotations["label"].to_numpy(dtype=np.int32)
    return out


def _pairwise_agreement(answers: np.ndarray) -> tuple[np.ndarray, int]:
    """(M, M) agreement on the samples both annotators answered (NaN when none); seeded subsample."""
    m, n = answers.shape
    if n > AGREEMENT_SAMPLES:
        answers = answers[:, np.sort(np.random.default_rng(0).choice(n, AGREEMENT_SAMPLES, replace=False))]
    out = np.full((m, m), np.nan)
    given = answers >= 0
    for a in range(m):
        both = given[a][None] & given
        same = (answers[a][None] == answers) & both
        counts = both.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a] = np.where(counts > 0, same.sum(axis=1) / np.maximum(counts, 1), np.nan)
    return out, answers.shape[1]


def _examples(doc: _Doc, config: RunConfig, class_names: list[str], samples: pd.DataFrame, sets: np.ndarray,
              plural: np.ndarray, truth: np.ndarray) -> None:
    per_class = config.aggregate.report_examples_per_class
    if per_class == 0:
        doc.text("Example grid turned off (aggregate.report_examples_per_class = 0).")
        return
    try:
        from coreg.data import load_dataset

        dataset = load_dataset(config.data)
    except CoregError as err:
        doc.text(f"Example images unavailable: {err}")
        return
    if list(dataset.class_names) != list(class_names):
        doc.text("Example images unavailable: the configured data set has other class names.")
        return
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    ids = samples["sample_id"].to_numpy()
    classes = list(range(min(len(class_names), MAX_GRID_CLASSES)))
    chosen: dict[int, list[int]] = {}
    for c in classes:
        # Samples the plurality vote gives to c first, then any whose set holds c.
        first = [i for i in np.flatnonzero(plural == c) if ids[i] in position][:per_class]
        extra = [i for i in np.flatnonzero(sets[:, c] & (plural != c)) if ids[i] in position]
        chosen[c] = (first + extra)[:per_class]
    if not any(chosen.values()):
        doc.text("No example images to show.")
        return
    plt = _plt()
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.7 * per_class, 1.9 * len(classes)), squeeze=False)
    for row, c in enumerate(classes):
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(chosen[c]):
                continue
            i = chosen[c][col]
            try:
                image = dataset.load_image(position[ids[i]])
            except CoregError:
                continue
            ax.imshow(np.asarray(image.convert("RGB")))
            label = ",".join(class_names[j][:10] for j in np.flatnonzero(sets[i]))
            gt = f"\ngt: {class_names[truth[i]][:12]}" if truth[i] >= 0 else ""
            ax.set_title(f"{{{label[:30]}}}{gt}", fontsize=6)
        axes[row][0].text(-0.1, 0.5, class_names[c][:14], transform=axes[row][0].transAxes, ha="right",
                          va="center", fontsize=8)
    if len(class_names) > MAX_GRID_CLASSES:
        doc.text(f"First {MAX_GRID_CLASSES} of {len(class_names)} classes shown.")
    doc.text(f"Up to {per_class} samples per class (row c: samples the plurality vote gives to c, then others "
             "whose set holds c), titled with their candidate set and, when known, the true label.")
    doc.figure("examples", fig, "example images per class with their candidate sets")


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #f2f2f2; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>{title}</h1>
<nav><ol>{toc}</ol></nav>
{body}
</body></html>
"""
