"""Resumable, bounded-memory open_clip annotation: a persistent work folder of shards.

Layout of the work folder (``annotate.work_dir``, default ``.<out name>.work`` beside the
output folder)::

    <work>/<model key>/meta.json                 what the shards were made with
    <work>/<model key>/shard-00003.skipped.json  unreadable images of shard 3 (written first)
    <work>/<model key>/shard-00003.parquet       annotation rows of shard 3 (its presence = done)

Shard ``s`` holds samples ``[s * shard_size, (s + 1) * shard_size)`` of the annotated
samples (ordered by id). Rows are streamed into ``shard-XXXXX.parquet.partial`` batch by
batch (memory bounded by the batch) and renamed when the shard is complete, so a crash
leaves only finished shards behind; the next run skips them. The model key hashes
everything the rows depend on (model config, class names, sample ids, shard size,
precision), so a changed config never reuses stale shards, while adding a second model
keeps the first model's shards. The stage publishes the output folder atomically and
then deletes the work folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from coreg.annotate.openclip import (
    ZeroShotScorer,
    batch_loader,
    class_texts,
    default_prefix,
    input_size,
    load_model,
    logit_scale,
    resolve_device,
    text_embeddings,
)
from coreg.atomic import write_json
from coreg.config import AnnotateConfig, DataConfig
from coreg.contracts import ANNOTATIONS_SCHEMA
from coreg.data.dataset import ImageDataset, is_uri
from coreg.errors import CoregError

log = logging.getLogger(__name__)


class AnnotateInterrupted(RuntimeError):
    """Raised by the ``stop_after_shards`` test hook, as if the process had been killed there."""


@dataclass
class ModelShards:
    """Where one model's finished shards are and the annotator names they hold."""

    directory: Path
    prefix: str
    annotators: list[str]
    templates: list[str]
    logit_scale: float | None = None
    images_per_second: float | None = None
    seconds: float = 0.0
    shards_reused: int = 0


@dataclass
class ShardPlan:
    """Sample ranges of the shards."""

    n: int
    shard_size: int

    @property
    def count(self) -> int:
        return math.ceil(self.n / self.shard_size) if self.n else 0

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(self.n, start + self.shard_size)


@dataclass
class OpenClipRun:
    models: list[ModelShards]
    plan: ShardPlan
    device: str
    skipped: dict[int, str] = field(default_factory=dict)  # position -> reason


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.parquet"


def annotator_names(prefix: str, count: int) -> list[str]:
    """``<prefix>/t00`` ...: zero-padded so names sort in template order."""
    width = max(2, len(str(count - 1)))
    return [f"{prefix}/t{t:0{width}d}" for t in range(count)]


def model_key(model: dict[str, Any], class_names: list[str], sample_ids: list[str], cfg: AnnotateConfig,
              data: DataConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model, "classes": class_names, "shard_size": cfg.shard_size,
                              "precision": cfg.precision, "data": data.model_dump(mode="json")},
                             sort_keys=True).encode())
    for sid in sample_ids:
        digest.update(sid.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def rows_table(sample_ids: list[str], names: list[str], probs: np.ndarray) -> pa.Table:
    """Annotation rows (sample-major) for a (B, T, K) probability block, built without pandas."""
    b, t, k = probs.shape
    labels = probs.argmax(axis=2)
    chosen = np.take_along_axis(probs, labels[:, :, None], axis=2)[:, :, 0]
    offsets = pa.array(np.arange(0, b * t * k + 1, k, dtype=np.int32))
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(np.asarray(sample_ids, dtype=object), t), pa.string()),
            pa.array(np.tile(np.asarray(names, dtype=object), b), pa.string()),
            pa.array(labels.reshape(-1).astype(np.int32)),
            pa.array(chosen.reshape(-1).astype(np.float32)),
            pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1), pa.float32())),
        ],
        schema=ANNOTATIONS_SCHEMA,
    )


def run_open_clip(
    dataset: ImageDataset, cfg: AnnotateConfig, data: DataConfig, work_dir: Path, *,
    progress: bool = True, stop_after_shards: int | None = None,
) -> OpenClipRun:
    """Annotate every pending shard with every model; return where the finished shards are."""
    if dataset.paths is not None and any(is_uri(p) for p in dataset.paths):
        first = next(p for p in dataset.paths if is_uri(p))
        raise CoregError(f"{first}: annotate.method 'open_clip' reads local image files only; copy the images "
                         "locally (e.g. with `aws s3 sync`) and point data.path at them")
    device = resolve_device(cfg.device)
    plan = ShardPlan(len(dataset), cfg.shard_size)
    run = OpenClipRun([], plan, str(device))
    finished_now = 0
    prefixes: set[str] = set()
    for number, model_cfg in enumerate(cfg.models):
        field_name = f"annotate.models[{number}]"
        templates, prompts = class_texts(model_cfg, dataset.class_names, field_name)
        prefix = default_prefix(model_cfg)
        if prefix in prefixes:
            raise CoregError(f"{field_name}: annotator prefix {prefix!r} is used twice; set annotator_prefix")
        prefixes.add(prefix)
        names = annotator_names(prefix, len(templates))
        key = model_key(model_cfg.model_dump(mode="json"), dataset.class_names, dataset.sample_ids, cfg, data)
        directory = Path(work_dir) / key
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "meta.json", {"model": model_cfg.model_dump(mode="json"), "annotators": names,
                                             "samples": plan.n, "shard_size": plan.shard_size})
        shards = ModelShards(directory, prefix, names, templates)
        run.models.append(shards)
        pending = [s for s in range(plan.count) if not shard_path(directory, s).is_file()]
        shards.shards_reused = plan.count - len(pending)
        if shards.shards_reused:
            log.info("%s: %d of %d shards already done in %s (resuming)", prefix, shards.shards_reused,
                     plan.count, directory)
        if pending:
            finished_now = _annotate_shards(dataset, cfg, model_cfg, field_name, device, shards, prompts, pending,
                                            plan, progress, stop_after_shards, finished_now)
        for s in range(plan.count):
            skipped_file = directory / f"shard-{s:05d}.skipped.json"
            if skipped_file.is_file():
                for pos, reason in json.loads(skipped_file.read_text(encoding="utf-8")):
                    run.skipped.setdefault(int(pos), str(reason))
    return run


def _annotate_shards(
    dataset: ImageDataset, cfg: AnnotateConfig, model_cfg: Any, field_name: str, device: Any,
    shards: ModelShards, prompts: list[list[list[str]]], pending: list[int], plan: ShardPlan,
    progress: bool, stop_after_shards: int | None, finished_now: int,
) -> int:
    loaded = load_model(model_cfg, device, field_name)
    text = text_embeddings(loaded, prompts)
    shards.logit_scale = logit_scale(model_cfg, loaded)
    scorer = ZeroShotScorer(loaded, text, shards.logit_scale, cfg.precision)
    batches: list[list[int]] = []
    shard_of_batch: list[int] = []
    for s in pending:
        start, end = plan.bounds(s)
        for b in range(start, end, cfg.batch_size):
            batches.append(list(range(b, min(end, b + cfg.batch_size))))
            shard_of_batch.append(s)
    last_batch = {s: i for i, s in enumerate(shard_of_batch)}
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc=shards.prefix, disable=not progress, smoothing=0.1)
    writer: pq.ParquetWriter | None = None
    skipped: list[tuple[int, str]] = []
    began = time.perf_counter()
    try:
        loader = batch_loader(dataset, loaded.preprocess, batches, cfg, device, input_size(loaded))
        for i, (positions, images, bad) in enumerate(loader):
            shard = shard_of_batch[i]
            partial = shard_path(shards.directory, shard).with_suffix(".parquet.partial")
            if writer is None:
                writer = pq.ParquetWriter(partial, ANNOTATIONS_SCHEMA)
                skipped = []
            skipped += bad
            if images is not None:
                probs = scorer(images)
                writer.write_table(rows_table([dataset.sample_ids[p] for p in positions], shards.annotators, probs))
            bar.update(len(positions) + len(bad))
            if last_batch[shard] == i:
                writer.close()
                writer = None
                write_json(shards.directory / f"shard-{shard:05d}.skipped.json", [[p, r] for p, r in skipped])
                os.replace(partial, shard_path(shards.directory, shard))
                finished_now += 1
                if stop_after_shards is not None and finished_now >= stop_after_shards:
                    raise AnnotateInterrupted(f"stopped after {finished_now} shard(s) (test hook)")
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    shards.seconds = time.perf_counter() - began
    shards.images_per_second = total / shards.seconds if shards.seconds > 0 else None
    log.info("%s: %d images in %.1f s (%.1f images/s)", shards.prefix, total, shards.seconds,
             shards.images_per_second or 0.0)
    return finished_now
