"""MLflow tracking: one MLflow run per pipeline run, stage results under stage prefixes.

Layout (why one run, not nested runs): the stages of a Kubeflow pipeline run in separate
pods, possibly hours apart, and a stage can be skipped (a run that starts from existing
annotations). One flat run per pipeline run, found again by its ``kfp_run_id`` tag, lets
every stage add to it without handing a run id from pod to pod, and makes runs directly
comparable in the MLflow UI (same metric names in every run). Names carry the stage:

- params: the resolved config, flattened (``train.epochs``, ``data.source``, ...);
- metrics: ``annotate.*`` (annotation summary), ``aggregate.*`` (candidate quality),
  ``train.*`` per epoch with ``step=epoch`` (losses, clean-split sizes,
  ``train.val_hit_rate``) plus ``train.selected_epoch``, ``test.*`` (test metrics);
- artifacts: ``annotate/``, ``aggregate/``, ``train/``, ``evaluate/`` (reports, plots,
  JSON files), and the logged model ``model`` (an MLflow LoggedModel linked to the run);
- tags: ``kfp_run_id``, ``coreg.version``, ``coreg.stages_done``.

The run is created by whichever stage comes first and ended (FINISHED) by the register
step; a pipeline that fails half-way leaves its run RUNNING with what it had logged.
A retried task finds the same run, rewrites the same artifact paths, logs no metric point
(name, step) the run already holds, and does not log the model again when the run already
holds a logged model of the same weights (tag ``coreg.weights_sha256``); the registry finds
the version of the run the same way.

Embedded default: with no tracking server configured the URI is
``sqlite:///<absolute path>/mlflow.db`` (MLflow 3.17 refuses a plain ``./mlruns`` store),
with artifacts in a folder beside the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coreg.errors import CoregError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

KFP_RUN_TAG = "kfp_run_id"
MODEL_NAME = "model"  # the logged model's name in the run
WEIGHTS_TAG = "coreg.weights_sha256"  # on the logged model: the sha256 of the model.pt it was logged from
DEFAULT_DB_DIR = "mlruns"
ARTIFACT_FILES = {
    "annotate": ("annotation_summary.json", "config.yaml"),
    "aggregate": ("quality.json", "quality.md", "quality_report.html"),
    "train": ("history.json",),
    "evaluate": ("metrics.json", "report.md", "confusion_matrix.png", "training_curves.png"),
}


class TrackingConfig(BaseModel):
    """Where runs and models are tracked, and the promotion rule of the model registry."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    uri: str | None = Field(
        None, description="MLflow tracking URI (http://mlflow.mlflow:5000, sqlite:///abs/path.db). Default: "
        "MLFLOW_TRACKING_URI, else the embedded sqlite:///<cwd>/mlruns/mlflow.db.")
    experiment: str = Field("coreg", description="MLflow experiment that receives the runs.")
    model_name: str = Field("coreg", description="Registered model name in the MLflow model registry.")
    promotion_metric: Literal["accuracy", "balanced_accuracy"] = Field(
        "accuracy", description="Test metric that decides promotion to the 'champion' alias.")
    promotion_margin: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="The challenger becomes champion only if it beats the champion by more than this.")
    log_model: bool = Field(True, description="Log and register the trained model.")


def default_tracking_uri(base_dir: str | Path | None = None) -> str:
    """The embedded store: ``sqlite:///<abs>/mlflow.db`` under ``base_dir`` (default ./mlruns)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd() / DEFAULT_DB_DIR
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base}/mlflow.db"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def client_for(cfg: TrackingConfig) -> MlflowClient:
    """An MlflowClient on the configured store; also sets the fluent API's URIs (log_model uses them)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _guard(what: str, cfg: TrackingConfig) -> Iterator[None]:
    """Turn MLflow connection/permission failures into one-line CoregErrors naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CoregError(f"MLflow at {redact(resolve_uri(cfg))}: cannot {what} ({redact(first)[:200]})") from None
    except OSError as err:  # requests' ConnectionError is an OSError
        raise CoregError(f"MLflow at {redact(resolve_uri(cfg))}: cannot {what} ({type(err).__name__}); is the "
                         "tracking server up?") from None


def ensure_experiment(client: MlflowClient, cfg: TrackingConfig) -> str:
    """The experiment id, creating the experiment (with a local artifact folder for sqlite stores)."""
    with _guard(f"open experiment {cfg.experiment!r}", cfg):
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        uri = resolve_uri(cfg)
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
        return client.create_experiment(cfg.experiment, artifact_location=location)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": value}``; lists and None become JSON strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    out[key] = obj if isinstance(obj, str | int | float | bool) else json.dumps(obj)
    return out


_URI_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def redact(text: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URIs (tracking URIs, endpoints) in ``text``."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def flatten_params(config_dump: dict[str, Any]) -> dict[str, str]:
    """A config dump as MLflow params: flat, string-valued, URI passwords redacted.

    Secret fields are ``SecretStr`` and already dump as ``**********``; a password inside a URI
    (``http://user:pass@mlflow``) is not a field of its own, so it is cut here.
    """
    return {k: redact(str(v)) for k, v in flatten(config_dump).items()}


def numeric_leaves(obj: Any, prefix: str) -> dict[str, float]:
    """Finite numbers of a nested JSON document as metric name -> value."""
    return {k: float(v) for k, v in flatten(obj, prefix).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


_NOISY = (".annotators.", "set_size_histogram", "rule_params", ".per_annotator")
_METRIC_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(name: str) -> str:
    return _METRIC_BAD.sub("_", name)


def start_or_resume_run(cfg: TrackingConfig, kfp_run_id: str, config_dump: dict[str, Any] | None = None,
                        run_name: str | None = None) -> str:
    """The MLflow run of this pipeline run (by ``kfp_run_id`` tag), created on first use."""
    from mlflow.entities import Param, RunTag

    from coreg import __version__

    client = client_for(cfg)
    exp_id = ensure_experiment(client, cfg)
    with _guard("find or create the run", cfg):
        found = client.search_runs([exp_id], filter_string=f"tags.{KFP_RUN_TAG} = '{kfp_run_id}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = client.create_run(exp_id, run_name=run_name or None,
                                tags={KFP_RUN_TAG: kfp_run_id, "coreg.version": __version__})
        params = [Param(k, v[:6000]) for k, v in flatten_params(config_dump or {}).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        client.log_batch(run.info.run_id, tags=[RunTag("coreg.stages_done", "")])
    log.info("MLflow run %s (kfp run %s) at %s", run.info.run_id, kfp_run_id, redact(resolve_uri(cfg)))
    return run.info.run_id


def _log_new_metrics(client: MlflowClient, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> int:
    """Log ``(step, {name: value})`` rows, leaving out each (name, step) the run already holds.

    Why: a retried task (or one killed half-way through logging) logs the same stage again.
    MLflow appends every logged point to a metric's history, so logging blindly would draw
    each epoch twice; asking which steps exist first keeps a retry from adding points.
    Returns the number of points logged.
    """
    from mlflow.entities import Metric

    wanted = [(metric_name(k), v, step) for step, values in rows for k, v in values.items()]
    present = set(client.get_run(run_id).data.metrics)
    done_steps = {key: {m.step for m in client.get_metric_history(run_id, key)}
                  for key in {k for k, _, _ in wanted} & present}
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v, step in wanted if step not in done_steps.get(k, ())]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    return len(metrics)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise CoregError(f"{path}: not valid JSON") from None


def history_metrics(history: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch numeric values of history.json as ``(epoch, {"train.<key>": value})``."""
    rows = []
    for i, entry in enumerate(history or []):
        epoch = int(entry.get("epoch", i))
        values = {f"train.{k}": float(v) for k, v in entry.items() if k != "epoch"
                  and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        rows.append((epoch, values))
    return rows


def stage_metrics(stage: str, folder: Path) -> dict[str, float]:
    """The summary metrics of a finished stage folder, named with the stage prefix."""
    if stage == "annotate":
        return numeric_leaves(_read_json(folder / "annotation_summary.json") or {}, "annotate.")
    if stage == "aggregate":
        # Per-annotator and histogram figures stay in the quality.json artifact: hundreds of metrics hide the rest.
        values = numeric_leaves(_read_json(folder / "quality.json") or {}, "aggregate.")
        return {k: v for k, v in values.items() if not any(s in k for s in _NOISY)}
    if stage == "train":
        history = _read_json(folder / "history.json") or []
        out: dict[str, float] = {}
        if history:
            last = history[-1]
            out.update({f"train.final.{k}": v for k, v in history_metrics([last])[0][1].items()})
            hits = [(h.get("val_hit_rate"), h.get("epoch", i)) for i, h in enumerate(history)
                    if isinstance(h.get("val_hit_rate"), int | float)]
            if hits:
                best, epoch = max(hits, key=lambda t: t[0])
                out["train.best_val_hit_rate"] = float(best)
                out["train.selected_epoch"] = float(epoch)
            out["train.epochs_run"] = float(len(history))
        return {k.replace("train.final.train.", "train.final."): v for k, v in out.items()}
    if stage == "evaluate":
        metrics = _read_json(folder / "metrics.json") or {}
        out = numeric_leaves({k: v for k, v in metrics.items() if k != "figures"}, "test.")
        out = {k: v for k, v in out.items() if "confusion_matrix" not in k and not any(s in k for s in _NOISY)}
        model = metrics.get("model") or {}
        per_class = [v for v in (model.get("per_class_accuracy") or {}).values() if v is not None]
        if per_class:
            out["test.model.balanced_accuracy"] = float(sum(per_class) / len(per_class))
        return out
    raise CoregError(f"unknown stage {stage!r}")


def log_stage(cfg: TrackingConfig, run_id: str, stage: str, folder: str | Path) -> dict[str, float]:
    """Log one finished stage folder into the pipeline's MLflow run; returns the summary metrics."""
    from mlflow.entities import RunTag

    folder = Path(folder)
    client = client_for(cfg)
    metrics = stage_metrics(stage, folder)
    with _guard(f"log the {stage} stage", cfg):
        rows = history_metrics(_read_json(folder / "history.json") or []) if stage == "train" else []
        _log_new_metrics(client, run_id, [*rows, (0, metrics)])
        for name in ARTIFACT_FILES[stage]:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name), artifact_path=stage)
        done = client.get_run(run_id).data.tags.get("coreg.stages_done", "")
        stages = [s for s in done.split(",") if s] + [stage]
        client.log_batch(run_id, tags=[RunTag("coreg.stages_done", ",".join(dict.fromkeys(stages)))])
    return metrics


def model_requirements() -> list[str]:
    """Explicit pins for the logged model (inferring them takes seconds and pins local builds)."""
    import numpy
    import torch

    from coreg import __version__

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
            f"coreg=={__version__}"]


def log_model(cfg: TrackingConfig, run_id: str, train_dir: str | Path) -> str:
    """Log the trained model to the run (pickle format keeps the class); returns its ``models:/`` URI.

    The signature is the network's real contract: normalised float32 images ``(n, C, H, W)``
    in, class logits out. Class names, image size and channels go into the model metadata
    so ``coreg predict`` can prepare images and name classes without the training folder.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from coreg import contracts
    from coreg.train import load_trained

    train_dir = Path(train_dir)
    client = client_for(cfg)
    model = load_trained(train_dir / "model.pt", torch.device("cpu"))
    digest = hashlib.sha256((train_dir / "model.pt").read_bytes()).hexdigest()
    with _guard("look for the model of an earlier attempt", cfg):
        ready, pending = _earlier_logged_model(client, run_id, digest)
    if ready is not None:
        log.info("run %s already holds these weights as logged model %s (retried task): not logged again",
                 run_id, ready.model_id)
        return ready.model_uri
    model.eval()
    arch = getattr(model, "arch", None) or {}
    size = int(arch.get("image_size") or model.image_size)
    channels = int(arch.get("in_channels") or model.in_channels)
    class_names = contracts.read_classes(train_dir)
    example = np.zeros((2, channels, size, size), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).cpu().numpy()
    signature = infer_signature(example, logits)
    with _guard("log the model", cfg), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            serialization_format="pickle",
            pip_requirements=model_requirements(),
            signature=signature,
            input_example=example,
            metadata={"class_names": class_names, "image_size": size, "channels": channels,
                      "selected_epoch": getattr(model, "selected_epoch", None)},
            # The weights travel as coreg's own model.pt too, so coreg loads them back with
            # torch.load(weights_only=True) instead of unpickling code (see load_registered_model).
            extra_files=[str(train_dir / "model.pt")],
            tags={WEIGHTS_TAG: digest},
            # An attempt killed while uploading left its logged model PENDING: complete that one.
            model_id=pending.model_id if pending is not None else None,
        )
    return info.model_uri


def _earlier_logged_model(client: MlflowClient, run_id: str, digest: str) -> tuple[Any | None, Any | None]:
    """``(ready, pending)``: the model an earlier attempt of this task logged to the run with these weights.

    A retried register task logs the same ``model.pt`` into the same run; MLflow would make a
    second logged model of it. A READY one is reused as is; a PENDING one (the attempt died
    while uploading) is completed instead of starting a new one. Other weights are a new model.
    """
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
        if (m.tags or {}).get(WEIGHTS_TAG) == digest]
    found.sort(key=lambda m: m.creation_timestamp or 0)
    ready = next((m for m in found if m.status == LoggedModelStatus.READY), None)
    pending = next((m for m in found if m.status == LoggedModelStatus.PENDING), None)
    return ready, pending


def load_registered_model(cfg: TrackingConfig, model_uri: str) -> Any:
    """Load a logged coreg model without unpickling: its ``extra_files/model.pt`` via ``load_trained``.

    ``mlflow.pytorch.load_model`` on a pickle-format model would run whatever code the pickle
    names; a registry that anyone with write access can add versions to must not be trusted
    that far. The pickled copy stays in the artifact for other MLflow consumers.
    """
    import tempfile

    import mlflow

    from coreg.train import load_trained

    client_for(cfg)
    with _guard(f"load {model_uri}", cfg), tempfile.TemporaryDirectory(prefix="coreg-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        weights = local / "extra_files" / "model.pt"
        if not weights.is_file():
            raise CoregError(f"{model_uri}: no extra_files/model.pt in the logged model; it was not logged by coreg")
        return load_trained(weights, "cpu")


def end_run(cfg: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    client = client_for(cfg)
    with _guard("end the run", cfg):
        client.set_terminated(run_id, status=status)
