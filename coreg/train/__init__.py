"""Co-Reg training: ``fit`` trains the two-network model, ``load_trained``/``predict_logits`` use it."""

from coreg.train.trainer import FitResult, fit, load_trained, predict_logits

__all__ = ["FitResult", "fit", "load_trained", "predict_logits"]
