"""A VLM-like annotator simulation for data sets without a VLM at hand (tests, CPU demos).

Real prompt templates of one VLM share that model's confusions: a "7" that looks like a
"1" fools most templates at once, while each template adds its own class preferences.
The simulation copies that structure so the noise is instance-dependent, not uniform:

1. A weak *teacher* (multinomial logistic regression) is fitted on a handful of labelled
   TRAIN-split images per class, seen through a degraded view (grey, downsampled, blurred).
   Its logits for every sample play the role of the VLM's image-text similarities. The
   logits are standardised to a fixed spread (``teacher_logit_scale``) so the annotator
   knobs below mean the same on every data set.
2. Each of M annotators ("prompt templates") adds its own per-class bias N(0, bias_scale),
   fresh per-sample noise N(0, logit_noise) and divides by its own temperature
   (log-uniform in ``temperature_range``): probs = softmax((logits + bias + noise) / T),
   answer = argmax. The temperature changes how peaked the probabilities are (which the
   top-k and ratio rules see) but not the answer, as with CLIP's logit scale.

Everything is drawn from ``numpy.random.default_rng(AnnotateConfig.seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import LogisticRegression

from coreg.config import AnnotateConfig
from coreg.data.dataset import ImageDataset
from coreg.errors import CoregError


@dataclass
class SimulatedAnnotations:
    """Per-annotator answers: ``labels`` (M, n), ``probs`` (M, n, K) and the teacher's view."""

    annotator_names: list[str]
    labels: np.ndarray
    probs: np.ndarray
    teacher_logits: np.ndarray
    teacher_indices: np.ndarray


def annotator_names(num_annotators: int, prefix: str = "sim-prompt") -> list[str]:
    """``sim-prompt-00`` ... zero-padded so names sort in annotator order."""
    width = max(2, len(str(num_annotators - 1)))
    return [f"{prefix}-{m:0{width}d}" for m in range(num_annotators)]


def teacher_features(dataset: ImageDataset, image_size: int, blur: float) -> np.ndarray:
    """The degraded view the teacher sees: grey, ``image_size`` px, Gaussian blur, flattened, in [0, 1]."""
    images = dataset.load_images(np.arange(len(dataset)), image_size, 1)[:, 0].astype(np.float32) / 255.0
    if blur > 0:
        images = gaussian_filter(images, sigma=(0.0, blur, blur), mode="nearest")
    return images.reshape(len(images), -1)


def choose_teacher_samples(
    labels: np.ndarray, split: np.ndarray, num_classes: int, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``per_class`` labelled TRAIN samples per class; test labels are never read.

    A class without any labelled train sample (a small ``data.limit``) is skipped; the
    teacher then ranks it below every class it knows (see :func:`fit_teacher_logits`).
    """
    train = np.flatnonzero(split == "train")
    train_labels = labels[train]
    chosen = [np.zeros(0, dtype=np.int64)]
    for c in range(num_classes):
        pool = train[train_labels == c]
        if len(pool):
            chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    fit = np.sort(np.concatenate(chosen))
    if len(np.unique(labels[fit])) < 2:
        raise CoregError(
            "annotate: the simulated teacher needs labelled train samples of at least 2 classes; "
            "raise data.limit or use another data set"
        )
    return fit


def fit_teacher_logits(
    features: np.ndarray, labels: np.ndarray, fit_indices: np.ndarray, num_classes: int, scale: float
) -> np.ndarray:
    """Teacher logits (n, K) for all samples, centred per sample and scaled to a mean spread of ``scale``.

    Classes the teacher never saw get each sample's lowest known logit: rarely chosen, but
    an annotator's bias or noise can still name them, as a VLM sometimes names an odd class.
    """
    model = LogisticRegression(max_iter=2000)
    model.fit(features[fit_indices], labels[fit_indices])
    # predict_log_proba is (n, K') for every K' >= 2, unlike decision_function for K' = 2.
    known = model.predict_log_proba(features)
    logits = np.repeat(known.min(axis=1, keepdims=True), num_classes, axis=1)
    logits[:, model.classes_] = known
    logits -= logits.mean(axis=1, keepdims=True)
    spread = float(logits.std(axis=1).mean())
    return logits * (scale / spread) if spread > 0 else logits


def simulate_annotators(
    teacher_logits: np.ndarray, cfg: AnnotateConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Biased, noisy, tempered copies of the teacher: labels (M, n) int64 and probs (M, n, K) float32."""
    n, k = teacher_logits.shape
    m = cfg.num_annotators
    lo, hi = cfg.temperature_range
    bias = rng.normal(0.0, cfg.bias_scale, size=(m, 1, k))
    temperature = np.exp(rng.uniform(np.log(lo), np.log(hi), size=(m, 1, 1)))
    noise = rng.normal(0.0, cfg.logit_noise, size=(m, n, k))
    z = (teacher_logits[None] + bias + noise) / temperature
    z -= z.max(axis=2, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=2, keepdims=True)
    return probs.argmax(axis=2), probs.astype(np.float32)


def simulate_vlm_annotations(dataset: ImageDataset, split: np.ndarray, cfg: AnnotateConfig) -> SimulatedAnnotations:
    """Run the whole simulation on a data set with ground-truth labels (train labels feed the teacher)."""
    split = np.asarray(split)
    if split.shape != (len(dataset),):
        raise ValueError("split must have one entry per sample")
    if not dataset.has_labels:
        raise CoregError(
            f"{dataset.source}: annotate.method 'simulate_vlm' needs ground-truth labels for its teacher; "
            "this data set has none (use real VLM annotations instead)"
        )
    rng = np.random.default_rng(cfg.seed)
    fit_idx = choose_teacher_samples(dataset.labels, split, dataset.num_classes, cfg.teacher_samples_per_class, rng)
    features = teacher_features(dataset, cfg.teacher_image_size, cfg.teacher_blur)
    logits = fit_teacher_logits(features, dataset.labels, fit_idx, dataset.num_classes, cfg.teacher_logit_scale)
    labels, probs = simulate_annotators(logits, cfg, rng)
    return SimulatedAnnotations(annotator_names(cfg.num_annotators), labels, probs, logits, fit_idx)


def simulation_frame(sample_ids: list[str], sim: SimulatedAnnotations) -> pd.DataFrame:
    """The annotations contract: one row per (sample, annotator), sample-major order."""
    m, n, k = sim.probs.shape
    labels = sim.labels.T.reshape(-1)  # (n * M,), sample-major
    probs = sim.probs.transpose(1, 0, 2).reshape(n * m, k)
    return pd.DataFrame(
        {
            "sample_id": np.repeat(np.asarray(sample_ids, dtype=object), m),
            "annotator": np.tile(np.asarray(sim.annotator_names, dtype=object), n),
            "label": labels.astype(np.int32),
            "probability": probs[np.arange(n * m), labels],
            "probs": list(probs),
        }
    )
