"""Annotation stage: simulated VLM prompt annotators or the synthetic NPLL protocol."""

from coreg.annotate.simulate import SimulatedAnnotations, annotator_names, simulate_vlm_annotations, simulation_frame
from coreg.annotate.stage import SUMMARY_FILE, annotation_summary, run_annotate
from coreg.annotate.synthetic import SyntheticCandidates, synthetic_candidates, synthetic_frame

__all__ = [
    "SUMMARY_FILE",
    "SimulatedAnnotations",
    "SyntheticCandidates",
    "annotation_summary",
    "annotator_names",
    "run_annotate",
    "simulate_vlm_annotations",
    "simulation_frame",
    "synthetic_candidates",
    "synthetic_frame",
]
