"""coreg: train image classifiers from VLM labels with Co-Reg (noisy partial label learning)."""

__version__ = "0.1.0"
