"""Kubeflow Pipelines components of coreg: one thin wrapper per stage (see each folder's README)."""
