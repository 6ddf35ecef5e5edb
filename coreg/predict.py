"""``coreg predict``: label a folder of images with the registered champion model.

The model comes from the MLflow registry (``models:/NAME@champion`` by default), so what
is served is always what the promotion rule chose. The model's metadata (class names,
image size, channels) says how to prepare images, so no training folder is needed.
Images are prepared exactly as in training (PIL bilinear resize, L or RGB, uint8 NCHW).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from coreg.atomic import atomic_path
from coreg.errors import CoregError
from coreg.tracking import TrackingConfig, _guard, client_for, load_registered_model

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    """One ``coreg predict`` call."""

    images: Path
    out: Path
    model_uri: str | None = None  # default: models:/<tracking.model_name>@champion
    batch_size: int = 256
    device: str = "cpu"


def list_images(folder: Path) -> list[Path]:
    from coreg.data import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise CoregError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise CoregError(f"{folder}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


def predict_folder(request: PredictRequest, cfg: TrackingConfig) -> Path:
    """Write one row per image (path, label, class_name, confidence) as CSV or Parquet (by suffix)."""
    import mlflow

    from coreg.data import ImageDataset
    from coreg.train import predict_logits

    if request.out.suffix.lower() not in (".csv", ".parquet"):
        raise CoregError(f"{request.out}: output must end in .csv or .parquet")
    paths = list_images(request.images)
    uri = request.model_uri or f"models:/{cfg.model_name}@champion"
    client_for(cfg)
    with _guard(f"load {uri}", cfg):
        info = mlflow.models.get_model_info(uri)
    model = load_registered_model(cfg, uri)
    meta = info.metadata or {}
    arch = getattr(model, "arch", {})
    class_names = list(meta.get("class_names") or [])
    size = int(meta.get("image_size") or arch.get("image_size"))
    channels = int(meta.get("channels") or arch.get("in_channels"))
    dataset = ImageDataset(sample_ids=[str(p) for p in paths], class_names=class_names or ["?"],
                           labels=np.full(len(paths), -1), paths=[str(p.resolve()) for p in paths])
    logits = predict_logits(model, dataset.load_images(np.arange(len(paths)), size, channels),
                            request.batch_size, request.device)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pred = probs.argmax(1)
    names = np.asarray(class_names, dtype=object)[pred] if class_names else pred.astype(str)
    table = pd.DataFrame({
        "path": [p.relative_to(request.images).as_posix() for p in paths],
        "label": pred.astype(np.int64),
        "class_name": names,
        "confidence": probs.max(1).astype(np.float32),
    })
    with atomic_path(request.out) as tmp:
        if request.out.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    log.info("labelled %d images with %s -> %s", len(paths), uri, request.out)
    return request.out
