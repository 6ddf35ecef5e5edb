"""The label-quality report of the aggregate stage: sections, embedded images, ground-truth tables."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from coreg.aggregate import QUALITY_REPORT_HTML, QUALITY_REPORT_MD, run_aggregate
from coreg.annotate import run_annotate
from coreg.config import RunConfig
from coreg.contracts import write_annotations, write_classes, write_samples
from coreg.report import SECTIONS

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects section ids, figures (name -> decoded PNG) and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: dict[str, bytes] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "h2" and a.get("id"):
            self.sections.append(str(a["id"]))
        if tag == "img":
            src = str(a.get("src", ""))
            assert src.startswith("data:image/png;base64,"), "images must be embedded, not linked"
            self.images[str(a.get("data-figure"))] = base64.b64decode(src.split(",", 1)[1])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    config = RunConfig.model_validate({"data": {"source": "digits", "limit": 300},
                                       "annotate": {"num_annotators": 8}})
    run_annotate(config, root / "ann", progress=False)
    return run_aggregate(config, root / "ann", root / "agg")


def test_html_report_has_every_section_and_embedded_plots(report_dir: Path) -> None:
    page = _parse(report_dir / QUALITY_REPORT_HTML)
    assert page.sections == [anchor for anchor, _ in SECTIONS]
    expected = {"class_balance", "set_sizes", "annotator_coverage", "agreement", "cooccurrence", "examples",
                "ground_truth"}
    assert expected <= set(page.images)
    for name, data in page.images.items():
        assert data.startswith(PNG), name
        assert len(data) > 1000, name
    text = " ".join(page.text)
    assert "zero-shot accuracy" in text and "partial accuracy" in text and "noise rate" in text
    assert "sim-prompt-00" in text  # per-annotator rows
    assert "seven" in text  # class names in the tables


def test_markdown_report_matches_quality_json(report_dir: Path) -> None:
    md = (report_dir / QUALITY_REPORT_MD).read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    quality = json.loads((report_dir / "quality.json").read_text())
    coverage = quality["all"]["coverage"]
    assert f"| partial accuracy (true label in S) | {100 * coverage:.1f}% |" in md
    assert f"| all | {quality['all']['labelled_samples']} |" in md  # the per-class ground-truth table total


def test_report_without_ground_truth_or_images(tmp_path: Path) -> None:
    """Hand-made annotate folder of samples the configured data set does not have, labels unknown."""
    folder = tmp_path / "ann"
    write_classes(folder, ["w", "x", "y"])
    write_samples(folder, pd.DataFrame({"sample_id": ["s0", "s1"], "split": "train", "label": [-1, -1]}))
    write_annotations(folder, pd.DataFrame({"sample_id": ["s0", "s0", "s1"], "annotator": ["a", "b", "a"],
                                            "label": [0, 1, 2], "probability": [None] * 3, "probs": [None] * 3}))
    out = run_aggregate(RunConfig(), folder, tmp_path / "agg")
    page = _parse(out / QUALITY_REPORT_HTML)
    text = " ".join(page.text)
    assert "No ground truth is known" in text
    assert "Example images unavailable" in text  # digits has other class names: no grid, no failure
    assert "ground_truth" not in page.images and "examples" not in page.images
    assert "class_balance" in page.images


def test_report_can_be_turned_off(tmp_path: Path) -> None:
    config = RunConfig.model_validate({"data": {"source": "digits", "limit": 50},
                                       "annotate": {"num_annotators": 3}, "aggregate": {"report": False}})
    run_annotate(config, tmp_path / "ann", progress=False)
    out = run_aggregate(config, tmp_path / "ann", tmp_path / "agg")
    assert not (out / QUALITY_REPORT_HTML).exists() and not (out / QUALITY_REPORT_MD).exists()
