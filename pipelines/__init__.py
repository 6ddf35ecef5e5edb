"""The coreg Kubeflow pipeline (see coreg_pipeline.py and README.md)."""
