"""Model registry: register every trained model, promote it only when it is better.

Rule: each new version gets the alias ``challenger`` and its test metrics as version tags.
It takes the alias ``champion`` if there is no champion yet, or if its value of the
promotion metric (``tracking.promotion_metric``) beats the champion's by **more than**
``tracking.promotion_margin`` *on the same evaluation data*. "Same data" is checked with a
fingerprint of the test split (sample ids and labels): when the champion's recorded
figure was measured on other data, the champion model is loaded from the registry and
re-evaluated on the challenger's test split, so the two figures always compare like with
like. A challenger without a test figure (no ground-truth labels) is never promoted.

The decision, both figures, the metric, the margin and the reason are written as tags on
the new version (``promotion.*``) and returned as a :class:`PromotionDecision`, which the
pipeline writes as JSON and Markdown.

A ``train.method=zero_shot`` run has no network and registers nothing: :func:`record_not_registered`
writes that decision to the same outputs instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from coreg.errors import CoregError
from coreg.tracking import TrackingConfig, _guard, client_for, load_registered_model

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
FINGERPRINT_TAG = "coreg.eval_fingerprint"
RUN_ID_TAG = "mlflow_run_id"  # the pipeline run's MLflow run, on each model version it registered


class PromotionDecision(BaseModel):
    """What the registry step decided and why (written as tags, JSON and Markdown)."""

    model_name: str
    version: str
    metric: str
    margin: float
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    champion_reevaluated: bool = False
    promoted: bool
    reason: str
    eval_fingerprint: str | None = None
    run_id: str | None = None
    decided_at: str

    def to_markdown(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        verdict = "**promoted to champion**" if self.promoted else "**not promoted** (champion unchanged)"
        champ = f"version {self.champion_version}" if self.champion_version else "none"
        return "\n".join([
            f"# Model `{self.model_name}` version {self.version}: {verdict}",
            "",
            f"| | {self.metric} |",
            "|---|---|",
            f"| challenger (version {self.version}) | {fmt(self.challenger_value)} |",
            f"| previous champion ({champ}) | {fmt(self.champion_value)} |",
            "",
            f"Rule: promote if challenger - champion > margin {self.margin}, on the same evaluation data"
            f"{' (champion re-evaluated on this test split)' if self.champion_reevaluated else ''}.",
            "",
            f"Reason: {self.reason}",
            "",
        ])


def eval_fingerprint(samples: Any) -> str:
    """A short hash of the test split (ids and labels): equal fingerprints mean the same evaluation data."""
    test = samples[samples["split"] == "test"].sort_values("sample_id")
    digest = hashlib.sha256()
    for sid, label in zip(test["sample_id"], test["label"], strict=True):
        digest.update(f"{sid}\t{int(label)}\n".encode())
    return digest.hexdigest()[:16]


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """``accuracy`` or ``balanced_accuracy`` (mean per-class accuracy) from evaluate's metrics.json."""
    model = metrics.get("model") or {}
    if metric == "accuracy":
        value = model.get("accuracy")
        return None if value is None else float(value)
    per_class = [v for v in (model.get("per_class_accuracy") or {}).values() if v is not None]
    return float(np.mean(per_class)) if per_class else None


def evaluate_registered(cfg: TrackingConfig, model_uri: str, config: Any, train_dir: Path,
                        metric: str) -> float | None:
    """Score a registered model on the test split of ``train_dir`` (the challenger's evaluation data)."""

    from coreg import contracts
    from coreg.data import load_dataset
    from coreg.evaluate import classification_metrics
    from coreg.train import predict_logits

    samples = contracts.read_samples(train_dir)
    class_names = contracts.read_classes(train_dir)
    test = samples[(samples["split"] == "test") & (samples["label"] >= 0)]
    if test.empty:
        return None
    model = load_registered_model(cfg, model_uri)
    size, channels = _arch(model, "image_size"), _arch(model, "in_channels")
    dataset = load_dataset(config.data)
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    missing = [sid for sid in test["sample_id"] if sid not in position]
    if missing:
        raise CoregError(f"{train_dir}: test sample {missing[0]!r} is not in the configured data set")
    images = dataset.load_images([position[s] for s in test["sample_id"]], size, channels)
    pred = predict_logits(model, images, 1024, "cpu").argmax(1)
    return metric_value({"model": classification_metrics(test["label"].to_numpy(), pred, class_names)}, metric)


def _arch(model: Any, key: str) -> int:
    value = getattr(model, key, None)
    if value is None:
        value = getattr(model, "arch", {}).get(key)
    if value is None:
        raise CoregError(f"registered model has no {key!r}; it was not trained by coreg")
    return int(value)


def register_version(cfg: TrackingConfig, model_uri: str, run_id: str | None, tags: dict[str, Any]) -> str:
    """Register ``model_uri`` under ``cfg.model_name``; returns the new version number as a string."""
    import mlflow

    client = client_for(cfg)
    tags = {k: str(v) for k, v in tags.items()} | ({RUN_ID_TAG: run_id} if run_id else {})
    with _guard(f"register model {cfg.model_name!r}", cfg):
        mv = _version_of_run(client, cfg.model_name, run_id)
        if mv is None:
            # The run id tag is part of the registration itself, so a task killed right after it
            # and retried finds this version instead of registering a second one.
            mv = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
        else:
            log.info("model %r version %s already registered for run %s (retried task)", cfg.model_name,
                     mv.version, run_id)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, mv.version)
    return str(mv.version)


def _version_of_run(client: Any, name: str, run_id: str | None) -> Any | None:
    """The version an earlier attempt of this pipeline run registered (tagged with its MLflow run id)."""
    if not run_id:
        return None
    found = [mv for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
             if (mv.tags or {}).get(RUN_ID_TAG) == run_id]
    return min(found, key=lambda mv: int(mv.version)) if found else None


def current_champion(cfg: TrackingConfig) -> Any | None:
    """The champion ModelVersion, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    try:
        return client.get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
            return None
        with _guard("read the champion alias", cfg):
            raise


def decide(cfg: TrackingConfig, version: str, challenger_value: float | None, fingerprint: str | None,
           config: Any = None, train_dir: Path | None = None, run_id: str | None = None) -> PromotionDecision:
    """Compare the new version with the champion, move the alias if it wins, record the decision."""
    client = client_for(cfg)
    metric, margin = cfg.promotion_metric, cfg.promotion_margin
    champion = current_champion(cfg)
    champ_version = str(champion.version) if champion is not None else None
    champ_value: float | None = None
    reevaluated = False
    if champion is not None and champ_version != version:
        tags = champion.tags or {}
        recorded = tags.get(f"metric.{metric}")
        if tags.get(FINGERPRINT_TAG) == fingerprint and recorded not in (None, "", "None"):
            champ_value = float(recorded)
        elif config is not None and train_dir is not None:
            log.info("champion v%s was evaluated on other data: re-evaluating it on this test split", champ_version)
            champ_value = evaluate_registered(cfg, f"models:/{cfg.model_name}/{champ_version}", config, train_dir,
                                              metric)
            reevaluated = True

    if challenger_value is None:
        promoted, reason = False, f"the challenger has no test {metric} (no ground-truth labels)"
    elif champion is None:
        promoted, reason = True, "no champion yet"
    elif champ_version == version:
        promoted, reason = True, "this version already is the champion"
    elif champ_value is None:
        promoted, reason = True, f"the champion has no {metric} on this evaluation data"
    elif challenger_value - champ_value > margin:
        promoted, reason = True, (f"{metric} {challenger_value:.4f} beats the champion's {champ_value:.4f} "
                                  f"by more than {margin}")
    else:
        promoted, reason = False, (f"{metric} {challenger_value:.4f} does not beat the champion's "
                                   f"{champ_value:.4f} by more than {margin}")
    decision = PromotionDecision(
        model_name=cfg.model_name, version=version, metric=metric, margin=margin,
        challenger_value=challenger_value, champion_version=champ_version, champion_value=champ_value,
        champion_reevaluated=reevaluated, promoted=promoted, reason=reason, eval_fingerprint=fingerprint,
        run_id=run_id, decided_at=datetime.now(UTC).isoformat(),
    )
    with _guard("record the promotion decision", cfg):
        if promoted:
            client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
        for key, value in {
            "promotion.decision": "promoted" if promoted else "rejected",
            "promotion.metric": metric, "promotion.margin": margin,
            "promotion.challenger_value": challenger_value, "promotion.champion_value": champ_value,
            "promotion.champion_version": champ_version, "promotion.reason": reason,
        }.items():
            client.set_model_version_tag(cfg.model_name, version, key, "None" if value is None else str(value))
    log.info("model %s v%s: %s", cfg.model_name, version, reason)
    return decision


def register_and_promote(cfg: TrackingConfig, run_id: str | None, model_uri: str, train_dir: Path,
                         evaluate_dir: Path, config: Any = None) -> PromotionDecision:
    """Register the logged model with its test metrics as tags, alias it challenger, maybe champion."""
    from coreg import contracts

    metrics_path = Path(evaluate_dir) / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CoregError(f"{metrics_path}: file not found") from None
    fingerprint = eval_fingerprint(contracts.read_samples(Path(train_dir)))
    values = {m: metric_value(metrics, m) for m in ("accuracy", "balanced_accuracy")}
    tags = {f"metric.{m}": v for m, v in values.items()} | {FINGERPRINT_TAG: fingerprint}
    version = register_version(cfg, model_uri, run_id, tags)
    return decide(cfg, version, values[cfg.promotion_metric], fingerprint, config, Path(train_dir), run_id)


def promote_version(cfg: TrackingConfig, version: str, *, force: bool = False) -> PromotionDecision:
    """``coreg promote``: make ``version`` champion (forced) or apply the rule with its recorded figures."""
    client = client_for(cfg)
    with _guard(f"read version {version} of {cfg.model_name!r}", cfg):
        mv = client.get_model_version(cfg.model_name, str(version))
    tags = mv.tags or {}
    raw = tags.get(f"metric.{cfg.promotion_metric}")
    value = None if raw in (None, "", "None") else float(raw)
    if force:
        with _guard("set the champion alias", cfg):
            client.set_registered_model_alias(cfg.model_name, CHAMPION, str(version))
            client.set_model_version_tag(cfg.model_name, str(version), "promotion.decision", "forced")
        return PromotionDecision(
            model_name=cfg.model_name, version=str(version), metric=cfg.promotion_metric,
            margin=cfg.promotion_margin, challenger_value=value, champion_version=None, champion_value=None,
            promoted=True, reason="promoted by hand (--force)", eval_fingerprint=tags.get(FINGERPRINT_TAG),
            decided_at=datetime.now(UTC).isoformat())
    champion = current_champion(cfg)
    if champion is not None and (champion.tags or {}).get(FINGERPRINT_TAG) != tags.get(FINGERPRINT_TAG):
        raise CoregError(f"model {cfg.model_name!r}: version {version} and champion version {champion.version} "
                         "were evaluated on different data; rerun the pipeline or pass --force")
    return decide(cfg, str(version), value, tags.get(FINGERPRINT_TAG))


def record_not_registered(cfg: TrackingConfig, run_id: str, reason: str, json_path: Path,
                          md_path: Path) -> dict[str, Any]:
    """A run that registers nothing (``train.method=zero_shot``: no network): write and log the decision.

    The decision goes to the register step's outputs (JSON and Markdown), as artifact ``registry/`` and
    tag ``coreg.promoted=false`` on the MLflow run; no model is logged, no version registered, the
    champion is unchanged.
    """
    from coreg.atomic import write_text

    decision = {"model_name": cfg.model_name, "version": "", "registered": False, "promoted": False,
                "reason": reason, "run_id": run_id, "decided_at": datetime.now(UTC).isoformat()}
    write_text(json_path, json.dumps(decision, indent=2) + "\n")
    write_text(md_path, f"# Model `{cfg.model_name}`: **not registered**\n\nReason: {reason} (champion unchanged; "
                        "the run's test metrics are in MLflow).\n")
    client = client_for(cfg)
    with _guard("record the registry decision", cfg):
        client.log_artifact(run_id, str(json_path), artifact_path="registry")
        client.set_tag(run_id, "coreg.promoted", "false")
    return decision


def write_decision(decision: PromotionDecision, json_path: Path | None, md_path: Path | None) -> None:
    from coreg.atomic import write_text

    if json_path is not None:
        write_text(json_path, decision.model_dump_json(indent=2) + "\n")
    if md_path is not None:
        write_text(md_path, decision.to_markdown())
