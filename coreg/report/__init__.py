"""Reports written by the stages: the label-quality report of the aggregate stage."""

from coreg.report.quality import SECTIONS, QualityReport, build_quality_report

__all__ = ["SECTIONS", "QualityReport", "build_quality_report"]
