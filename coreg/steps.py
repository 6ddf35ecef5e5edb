"""What each pipeline component does, as plain functions the KFP wrappers call.

The components in ``components/`` stay a few lines each (their source is shipped inside
the compiled pipeline and runs in the project image); everything worth testing lives
here: resolving the run's settings, materialising ``s3://`` inputs, running the library
stage, publishing its folder to S3 and logging it to MLflow.

A step is given the pipeline's parameters as a :class:`StepSettings`; the whole config
travels as YAML text, so a run is reproducible from its parameters alone.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from coreg.config import RunConfig, apply_override, parse_config
from coreg.errors import CoregError
from coreg.storage import StorageConfig, is_s3, join_uri, materialize, publish_dir
from coreg.tracking import TrackingConfig

log = logging.getLogger(__name__)


class StepSettings(BaseModel):
    """The pipeline parameters every component receives (empty values mean "as in the config")."""

    config_yaml: str = ""
    overrides: list[str] = Field(default_factory=list)
    data_uri: str = ""
    class_names: list[str] = Field(default_factory=list)
    tracking_uri: str = ""
    experiment: str = ""
    model_name: str = ""
    storage_uri: str = ""
    kfp_run_id: str = "local"
    run_name: str = ""


class Resolved(BaseModel):
    """The run's three configuration parts, resolved."""

    config: RunConfig
    tracking: TrackingConfig
    storage: StorageConfig


def cache_dir() -> Path:
    return Path(os.environ.get("COREG_CACHE_DIR") or Path(tempfile.gettempdir()) / "coreg-cache")


def split_sections(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Take ``tracking:`` and ``storage:`` out of a raw config unless RunConfig already knows them."""
    raw = dict(raw)
    tracking = raw.pop("tracking", None) if "tracking" not in RunConfig.model_fields else None
    storage = raw.pop("storage", None) if "storage" not in RunConfig.model_fields else None
    return raw, tracking or {}, storage or {}


def resolve(settings: StepSettings) -> Resolved:
    """Config YAML + overrides + explicit parameters -> validated RunConfig, TrackingConfig, StorageConfig."""
    from coreg.config import DEFAULT_CONFIG

    text = settings.config_yaml or DEFAULT_CONFIG.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise CoregError("pipeline parameter config_yaml: not valid YAML") from None
    if not isinstance(raw, dict):
        raise CoregError("pipeline parameter config_yaml: must be a mapping of sections")
    for item in settings.overrides:
        apply_override(raw, item)
    if settings.data_uri:
        raw.setdefault("data", {})["path"] = settings.data_uri
    if settings.class_names:
        raw.setdefault("data", {})["class_names"] = list(settings.class_names)
    raw, tracking_raw, storage_raw = split_sections(raw)
    config = parse_config(raw, source="pipeline config")
    tracking = _section(TrackingConfig, getattr(config, "tracking", None) or tracking_raw, "tracking")
    storage = _section(StorageConfig, getattr(config, "storage", None) or storage_raw, "storage")
    if settings.tracking_uri:
        tracking.uri = settings.tracking_uri
    if settings.experiment:
        tracking.experiment = settings.experiment
    if settings.model_name:
        tracking.model_name = settings.model_name
    if settings.storage_uri:
        storage.uri = settings.storage_uri
    return Resolved(config=config, tracking=tracking, storage=storage)


def _section(model: type[BaseModel], value: Any, name: str) -> Any:
    if isinstance(value, model):
        return value.model_copy()
    if isinstance(value, BaseModel):
        value = value.model_dump()
    try:
        return model.model_validate(value or {})
    except ValueError as err:
        first = err.errors()[0] if hasattr(err, "errors") else {"loc": (), "msg": str(err)}
        loc = ".".join(str(p) for p in first["loc"])
        raise CoregError(f"pipeline config: invalid field '{name}.{loc}': {first['msg']}") from None


def local_data(config: RunConfig, storage: StorageConfig) -> RunConfig:
    """Download ``data.path`` when it is an ``s3://`` URI (a published folder, a plain prefix or one file)."""
    path = config.data.path
    if not path or not is_s3(path):
        return config
    from coreg.storage import fetch_prefix

    local = fetch_prefix(path, cache_dir() / "data", storage)
    updated = config.model_copy(deep=True)
    updated.data.path = str(local)
    return updated


def input_dir(artifact_path: str | None, artifact_uri: str | None, storage: StorageConfig) -> Path:
    """The local folder of an input artifact: the launcher's copy, else a download of its ``s3://`` URI.

    On a cluster the KFP launcher downloads input artifacts; in the local runner an artifact
    imported from ``s3://`` is not downloaded, so the step fetches the published folder itself.
    """
    if artifact_path and Path(artifact_path).is_dir() and any(Path(artifact_path).iterdir()):
        return Path(artifact_path)
    if artifact_uri and is_s3(artifact_uri):
        return materialize(artifact_uri, cache_dir() / "inputs", storage)
    location = artifact_uri or artifact_path or ""
    if location and Path(location).is_dir():
        return Path(location)
    raise CoregError(f"{location or '<empty>'}: input folder not found")


def publish(resolved: Resolved, settings: StepSettings, stage: str, folder: Path) -> str | None:
    """Publish a finished stage folder to ``<storage.uri>/<kfp_run_id>/<stage>``; None when S3 is off."""
    if not resolved.storage.uri:
        return None
    uri = join_uri(resolved.storage.uri, settings.kfp_run_id, stage)
    return publish_dir(folder, uri, resolved.storage, meta={"stage": stage, "kfp_run_id": settings.kfp_run_id})


def track(resolved: Resolved, settings: StepSettings, stage: str, folder: Path) -> str:
    """Log a finished stage into the pipeline run's MLflow run; returns the MLflow run id."""
    from coreg import tracking

    run_id = tracking.start_or_resume_run(
        resolved.tracking, settings.kfp_run_id, resolved.config.model_dump(mode="json"),
        run_name=settings.run_name or None)
    tracking.log_stage(resolved.tracking, run_id, stage, folder)
    return run_id


def _finish(resolved: Resolved, settings: StepSettings, stage: str, folder: Path) -> dict[str, Any]:
    published = publish(resolved, settings, stage, folder)
    run_id = track(resolved, settings, stage, folder)
    return {"published_uri": published or "", "mlflow_run_id": run_id, "local_path": str(folder)}


def annotate_step(settings: StepSettings, out_dir: str) -> dict[str, Any]:
    from coreg.annotate import run_annotate

    resolved = resolve(settings)
    config = local_data(resolved.config, resolved.storage)
    folder = Path(run_annotate(config, Path(out_dir)))
    return _finish(resolved, settings, "annotate", folder)


def aggregate_step(settings: StepSettings, annotations_path: str | None, annotations_uri: str | None,
                   out_dir: str) -> dict[str, Any]:
    from coreg.aggregate import run_aggregate

    resolved = resolve(settings)
    config = local_data(resolved.config, resolved.storage)
    annotations = input_dir(annotations_path, annotations_uri, resolved.storage)
    folder = Path(run_aggregate(config, annotations, Path(out_dir)))
    return _finish(resolved, settings, "aggregate", folder)


def train_step(settings: StepSettings, candidates_path: str | None, candidates_uri: str | None,
               out_dir: str) -> dict[str, Any]:
    from coreg.train.stage import run_train

    resolved = resolve(settings)
    config = local_data(resolved.config, resolved.storage)
    candidates = input_dir(candidates_path, candidates_uri, resolved.storage)
    folder = Path(run_train(config, candidates, Path(out_dir), progress=False))
    return _finish(resolved, settings, "train", folder)


def evaluate_step(settings: StepSettings, model_path: str, annotations_path: str | None,
                  annotations_uri: str | None, out_dir: str) -> dict[str, Any]:
    """Evaluate; the annotations are passed explicitly because lineage paths of other pods may not exist."""
    import json

    from coreg.evaluate import run_evaluate

    resolved = resolve(settings)
    config = local_data(resolved.config, resolved.storage)
    annotations = input_dir(annotations_path, annotations_uri, resolved.storage)
    folder = Path(run_evaluate(config, Path(model_path), Path(out_dir), annotations_dir=annotations))
    result = _finish(resolved, settings, "evaluate", folder)
    result["metrics"] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return result


def register_step(settings: StepSettings, model_path: str, evaluation_path: str, decision_json: str,
                  decision_md: str) -> dict[str, Any]:
    """Log the model to the run, register it, apply the promotion rule, end the MLflow run.

    A ``train.method=zero_shot`` run has no network: nothing is logged or registered, and the
    decision outputs say so (its evaluate metrics are in the MLflow run as for any run).
    """
    from coreg import registry, tracking
    from coreg.baselines.zero_shot import NOT_REGISTERED_REASON, is_zero_shot_folder

    resolved = resolve(settings)
    run_id = tracking.start_or_resume_run(resolved.tracking, settings.kfp_run_id,
                                          resolved.config.model_dump(mode="json"), settings.run_name or None)
    if is_zero_shot_folder(Path(model_path)):
        decision = registry.record_not_registered(resolved.tracking, run_id, NOT_REGISTERED_REASON,
                                                  Path(decision_json), Path(decision_md))
        tracking.end_run(resolved.tracking, run_id)
        log.info("%s (run %s)", NOT_REGISTERED_REASON, run_id)
        return {"promoted": False, "version": "", "mlflow_run_id": run_id, "decision": decision}
    config = local_data(resolved.config, resolved.storage)
    if not resolved.tracking.log_model:
        from coreg.atomic import write_text

        tracking.end_run(resolved.tracking, run_id)
        write_text(decision_json, '{"promoted": false, "reason": "tracking.log_model is off"}\n')
        write_text(decision_md, "Model logging is off (tracking.log_model: false): nothing registered.\n")
        return {"promoted": False, "version": "", "mlflow_run_id": run_id}
    model_uri = tracking.log_model(resolved.tracking, run_id, model_path)
    decision = registry.register_and_promote(resolved.tracking, run_id, model_uri, Path(model_path),
                                             Path(evaluation_path), config)
    registry.write_decision(decision, Path(decision_json), Path(decision_md))
    client = tracking.client_for(resolved.tracking)
    client.log_artifact(run_id, decision_json, artifact_path="registry")
    client.set_tag(run_id, "coreg.model_version", decision.version)
    client.set_tag(run_id, "coreg.promoted", str(decision.promoted).lower())
    tracking.end_run(resolved.tracking, run_id)
    return {"promoted": decision.promoted, "version": decision.version, "mlflow_run_id": run_id,
            "model_uri": model_uri, "decision": decision.model_dump()}


def markdown_to_html(markdown: str, base_dir: Path | None = None) -> str:
    """A small, dependency-free rendering of coreg's reports (headings, tables, images, paragraphs).

    KFP's UI shows HTML artifacts inline; images are embedded as data URIs so the page is one file.
    """
    import base64
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out = ["<html><head><meta charset='utf-8'><style>body{font-family:sans-serif}td,th{border:1px solid #ccc;"
           "padding:2px 6px}table{border-collapse:collapse}</style></head><body>"]
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= {"-", ":"} for c in cells):
                    rows.append(cells)
                i += 1
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if r == 0 else 'td'}>{inline(c)}</{'th' if r == 0 else 'td'}>"
                                 for c in row) + "</tr>" for r, row in enumerate(rows)) + "</table>")
            continue
        image = re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip())
        heading = re.match(r"(#+) (.*)", line)
        if image and base_dir is not None and (base_dir / image.group(2)).is_file():
            data = base64.b64encode((base_dir / image.group(2)).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(image.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


def describe(stage: str, result: dict[str, Any], artifact: Any, summary_path: str | None) -> None:
    """Put the step's result on its output artifact's metadata and write the Markdown summary."""
    from coreg.atomic import write_text
    from coreg.tracking import stage_metrics

    folder = Path(result["local_path"])
    metrics = stage_metrics(stage, folder)
    artifact.metadata.update({"published_uri": result.get("published_uri", ""),
                              "mlflow_run_id": result.get("mlflow_run_id", ""), "stage": stage})
    artifact.metadata.update({k: v for k, v in metrics.items() if k.count(".") == 1})
    if summary_path is None:
        return
    lines = [f"# coreg {stage}", ""]
    if result.get("published_uri"):
        lines.append(f"Published to `{result['published_uri']}`.")
    lines += [f"MLflow run `{result.get('mlflow_run_id', '')}`.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    write_text(summary_path, "\n".join(lines) + "\n")
