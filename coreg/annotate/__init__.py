"""Annotation stage: open_clip zero-shot annotators, imported VLM answers, few-shot labels, and the
offline VLM-like simulation and synthetic NPLL protocol."""

from coreg.annotate.answers import AnswerMapper, Match
from coreg.annotate.imports import ImportedAnswers, SampleIndex, read_few_shot_labels, read_imported_answers
from coreg.annotate.shards import AnnotateInterrupted
from coreg.annotate.simulate import SimulatedAnnotations, annotator_names, simulate_vlm_annotations, simulation_frame
from coreg.annotate.stage import SUMMARY_FILE, annotation_summary, preview_table, run_annotate
from coreg.annotate.synthetic import SyntheticCandidates, synthetic_candidates, synthetic_frame
from coreg.annotate.templates import IMAGENET_TEMPLATES_27, resolve_templates

__all__ = [
    "IMAGENET_TEMPLATES_27",
    "SUMMARY_FILE",
    "AnnotateInterrupted",
    "AnswerMapper",
    "ImportedAnswers",
    "Match",
    "SampleIndex",
    "SimulatedAnnotations",
    "SyntheticCandidates",
    "annotation_summary",
    "annotator_names",
    "preview_table",
    "read_few_shot_labels",
    "read_imported_answers",
    "resolve_templates",
    "run_annotate",
    "simulate_vlm_annotations",
    "simulation_frame",
    "synthetic_candidates",
    "synthetic_frame",
]
