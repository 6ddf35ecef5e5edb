"""``coreg pipeline compile|run|submit|schedule``, ``coreg promote`` and ``coreg predict``.

:func:`register` adds these commands to coreg's argument parser and :func:`dispatch`
runs them (returning None for commands that are not this module's), so ``coreg.cli``
needs two lines to offer them. ``pipeline run --local`` is the embedded default: the
same pipeline runs on this machine with KFP's local SubprocessRunner, an MLflow store in
``./mlruns/mlflow.db`` and local folders; ``submit`` and ``schedule`` send it to a
Kubeflow Pipelines server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from coreg.atomic import write_text
from coreg.errors import CoregError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGE = "coreg-pipeline.yaml"
PIPELINE_COMMANDS = ("compile", "run", "submit", "schedule")


class PipelineParams(BaseModel):
    """The pipeline's run parameters, as the CLI builds them from a config file and flags."""

    config_yaml: str
    overrides: list[str] = Field(default_factory=list)
    data_uri: str = ""
    class_names: list[str] = Field(default_factory=list)
    annotations_uri: str = ""
    tracking_uri: str = ""
    experiment: str = "coreg"
    model_name: str = "coreg"
    storage_uri: str = ""


def _import_pipeline() -> Any:
    """The pipelines package lives beside coreg in a source checkout (and in the image)."""
    try:
        from pipelines import coreg_pipeline
    except ImportError:
        if not (REPO_ROOT / "pipelines" / "coreg_pipeline.py").is_file():
            raise CoregError(f"{REPO_ROOT}: pipelines/coreg_pipeline.py not found; run coreg pipeline commands "
                             "from a source checkout of coreg") from None
        sys.path.insert(0, str(REPO_ROOT))
        from pipelines import coreg_pipeline
    return coreg_pipeline


# ----------------------------------------------------------------------------- argument parsing
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML run config (default: the bundled demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="warnings only")


def _run_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-uri", default="", help="data.path for this run (local path or s3:// URI)")
    p.add_argument("--class-names", default="", help="comma-separated class names (data.class_names)")
    p.add_argument("--annotations", dest="annotations_uri", default="",
                   help="start from this existing annotate folder (s3:// or local path): annotate is skipped")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: config, env, ./mlruns)")
    p.add_argument("--experiment", default="", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--model-name", default="", help="registered model name (default: tracking.model_name)")
    p.add_argument("--storage-uri", default="", help="s3://bucket/prefix receiving every stage folder")


def _cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="container image of every component (default: COREG_IMAGE)")
    p.add_argument("--no-gpu", action="store_true", help="no GPU request, toleration or node selector")
    p.add_argument("--gpu-count", type=int, default=1, help="GPUs of the train task (per node with --train-nodes)")
    p.add_argument("--train-nodes", type=int, default=1, metavar="N",
                   help="N > 1: train on a Kubeflow Trainer TrainJob of N nodes (needs --storage-uri at run "
                        "time; see docs/deploy.md)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--token", default=None, help="bearer token (default: none / in-cluster credentials)")
    p.add_argument("--kfp-experiment", default="coreg", help="KFP experiment name")
    p.add_argument("--service-account", default=None,
                   help="Kubernetes service account the run's pods use, e.g. coreg-pipeline-runner from "
                        "k8s/base/rbac.yaml (needed for --train-nodes > 1; default: KFP's own)")


def register(subparsers: Any) -> None:
    """Add ``pipeline``, ``promote`` and ``predict`` to coreg's sub-command parser."""
    pipe = subparsers.add_parser("pipeline", help="Compile, run, submit or schedule the Kubeflow pipeline.",
                                 description="Compile, run, submit or schedule the Kubeflow pipeline.")
    sub = pipe.add_subparsers(dest="pipeline_command", required=True)

    p = sub.add_parser("compile", help="Write the pipeline's KFP IR YAML.")
    _common(p)
    _cluster(p)
    p.add_argument("--out", type=Path, default=Path(DEFAULT_PACKAGE), help=f"IR file (default {DEFAULT_PACKAGE})")

    p = sub.add_parser("run", help="Run the whole pipeline on this machine (KFP local runner).")
    _common(p)
    _run_params(p)
    p.add_argument("--local", action="store_true", required=True, help="run with the local SubprocessRunner")
    p.add_argument("--pipeline-root", type=Path, default=None,
                   help="folder for the local runner's artifacts (default: <output_dir>/kfp)")

    p = sub.add_parser("submit", help="Submit one run to a Kubeflow Pipelines server.")
    _common(p)
    _run_params(p)
    _cluster(p)
    _client_args(p)
    p.add_argument("--run-name", default=None, help="KFP run name (default: coreg-<timestamp>)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and report its state")
    p.add_argument("--timeout", type=int, default=6 * 3600, help="seconds to wait with --wait")
    p.add_argument("--out", type=Path, default=None, help="JSON summary file (default: ./kfp-run-<id>.json)")

    p = sub.add_parser("schedule", help="Create a recurring run (retraining on a schedule).")
    _common(p)
    _run_params(p)
    _cluster(p)
    _client_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first, e.g. '0 0 3 * * 1' (Mon 03:00)")
    p.add_argument("--name", default="coreg-retrain", help="recurring run name")
    p.add_argument("--max-concurrency", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON summary file (default: ./kfp-schedule-<id>.json)")

    p = subparsers.add_parser("promote", help="Promote a registered model version to champion.",
                              description="Apply the promotion rule to a registered version, or force it.")
    _common(p)
    p.add_argument("--version", required=True, help="model version to promote")
    p.add_argument("--model-name", default="", help="registered model (default: tracking.model_name)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI")
    p.add_argument("--force", action="store_true", help="make it champion without comparing")
    p.add_argument("--out", type=Path, default=Path("promotion.json"), help="decision JSON file")

    p = subparsers.add_parser("predict", help="Label a folder of images with the champion model.",
                              description="Label a folder of images with models:/NAME@champion.")
    _common(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output .csv or .parquet")
    p.add_argument("--model-uri", default=None, help="MLflow model URI (default: models:/NAME@champion)")
    p.add_argument("--model-name", default="", help="registered model (default: tracking.model_name)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")


# ----------------------------------------------------------------------------- helpers
def params_from_args(args: argparse.Namespace) -> PipelineParams:
    """Read the config file as text (the pipeline carries it whole) and check it resolves here first."""
    from coreg.config import DEFAULT_CONFIG
    from coreg.steps import StepSettings, resolve

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CoregError(f"{path}: config file not found") from None
    params = PipelineParams(
        config_yaml=text, overrides=list(args.overrides), data_uri=getattr(args, "data_uri", ""),
        class_names=[c.strip() for c in getattr(args, "class_names", "").split(",") if c.strip()],
        annotations_uri=getattr(args, "annotations_uri", ""), tracking_uri=getattr(args, "tracking_uri", ""),
        storage_uri=getattr(args, "storage_uri", ""),
    )
    resolved = resolve(StepSettings(**params.model_dump(exclude={"annotations_uri", "experiment", "model_name"}),
                                    experiment=getattr(args, "experiment", ""),
                                    model_name=getattr(args, "model_name", "")))
    params.experiment = resolved.tracking.experiment
    params.model_name = resolved.tracking.model_name
    params.storage_uri = resolved.storage.uri or ""
    params.tracking_uri = resolved.tracking.uri or ""
    return params


def cluster_options(args: argparse.Namespace) -> Any:
    module = _import_pipeline()
    if args.train_nodes < 1:
        raise CoregError(f"--train-nodes {args.train_nodes}: at least 1")
    return module.ClusterOptions(image=args.image, gpu=not args.no_gpu, gpu_count=args.gpu_count,
                                 train_nodes=args.train_nodes)


def compile_package(out: Path, options: Any = None) -> Path:
    module = _import_pipeline()
    out.parent.mkdir(parents=True, exist_ok=True)
    module.compile_pipeline(str(out), options)
    return out


def _kfp_client(args: argparse.Namespace) -> Any:
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2": we require 2.x
        return _kfp_call("connect", args.host, lambda: kfp.Client(host=args.host, namespace=args.namespace,
                                                                   existing_token=args.token))


def _kfp_call(what: str, host: str, fn: Any) -> Any:
    """Call the KFP API; connection failures and API errors become one-line CoregErrors."""
    from kfp_server_api.exceptions import ApiException

    try:
        return fn()
    except ApiException as err:
        raise CoregError(f"KFP at {host}: cannot {what} (HTTP {err.status} {err.reason})") from None
    except OSError as err:  # urllib3 connection errors are OSErrors
        raise CoregError(f"KFP at {host}: cannot {what} ({type(err).__name__}); is the API reachable?") from None
    except Exception as err:
        if type(err).__module__.startswith("urllib3"):
            raise CoregError(f"KFP at {host}: cannot {what} ({type(err).__name__}); is the API reachable?") from None
        raise


def _pipeline_arguments(params: PipelineParams) -> dict[str, Any]:
    return params.model_dump()


# ----------------------------------------------------------------------------- commands
def run_local(params: PipelineParams, pipeline_root: Path) -> dict[str, Any]:
    """Run the pipeline with KFP's local SubprocessRunner (in this Python env); returns a summary."""
    from kfp import local

    from coreg.tracking import default_tracking_uri

    module = _import_pipeline()
    if not params.tracking_uri:
        import os

        params = params.model_copy(update={"tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")
                                           or default_tracking_uri()})
    pipeline_root = pipeline_root.resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    before = set(pipeline_root.iterdir())
    started = time.time()
    try:
        with warnings.catch_warnings():
            # The local runner warns that cluster settings are ignored and that the project image is
            # "not a Python image": both expected here, where this very environment plays the image.
            warnings.filterwarnings("ignore", module=r"kfp\.local\..*")
            # The local runner honours retries; here a failure is a bug or a user error, so fail at once.
            options = module.ClusterOptions(gpu=False, retries=0, stage_retries=0)
            module.build_pipeline(options)(**_pipeline_arguments(params))
    except RuntimeError as err:
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).splitlines()[0] if str(err) else "")
        raise CoregError(f"local pipeline run failed: {first} (task logs above)") from None
    new = sorted(set(pipeline_root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    run_dir = new[-1] if new else pipeline_root
    summary: dict[str, Any] = {"run_dir": str(run_dir), "seconds": round(time.time() - started, 1),
                               "tracking_uri": params.tracking_uri, "model_name": params.model_name}
    decision = next(iter(sorted(run_dir.glob("register*/decision"))), None)
    if decision is not None and decision.is_file():
        summary["decision"] = json.loads(decision.read_text(encoding="utf-8"))
    write_text(run_dir / "run_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def submit(args: argparse.Namespace, params: PipelineParams) -> dict[str, Any]:
    """Compile, submit one run to KFP, optionally wait; returns a summary."""
    import tempfile

    client = _kfp_client(args)
    run_name = args.run_name or f"coreg-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(Path(tmp) / DEFAULT_PACKAGE, cluster_options(args))
        result = _kfp_call("create the run", args.host, lambda: client.create_run_from_pipeline_package(
            str(package), arguments=_pipeline_arguments(params), run_name=run_name,
            experiment_name=args.kfp_experiment, namespace=args.namespace, enable_caching=False,
            service_account=args.service_account))
    summary: dict[str, Any] = {"run_id": result.run_id, "run_name": run_name, "host": args.host,
                               "experiment": args.kfp_experiment, "service_account": args.service_account}
    if args.wait:
        run = _kfp_call("wait for the run", args.host,
                        lambda: client.wait_for_run_completion(result.run_id, timeout=args.timeout, sleep_duration=1))
        summary["state"] = str(getattr(run, "state", "UNKNOWN"))
        if summary["state"] != "SUCCEEDED":
            raise CoregError(f"KFP run {result.run_id} ({run_name}) ended {summary['state']}; see the KFP UI")
    return summary


def schedule(args: argparse.Namespace, params: PipelineParams) -> dict[str, Any]:
    """Create a recurring run (caching off, so every tick really retrains)."""
    import tempfile

    fields = args.cron.split()
    if len(fields) != 6:
        raise CoregError(f"--cron {args.cron!r}: KFP needs 6 fields (seconds first), e.g. '0 0 3 * * 1'")
    client = _kfp_client(args)
    experiment = _kfp_call("create the experiment", args.host,
                           lambda: client.create_experiment(args.kfp_experiment, namespace=args.namespace))
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(Path(tmp) / DEFAULT_PACKAGE, cluster_options(args))
        job = _kfp_call("create the recurring run", args.host, lambda: client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=args.name, cron_expression=args.cron,
            max_concurrency=args.max_concurrency, no_catchup=True, params=_pipeline_arguments(params),
            pipeline_package_path=str(package), enable_caching=False, service_account=args.service_account))
    return {"recurring_run_id": job.recurring_run_id, "name": args.name, "cron": args.cron, "host": args.host,
            "experiment_id": experiment.experiment_id, "service_account": args.service_account}


def _tracking_for(args: argparse.Namespace) -> Any:
    from coreg.steps import StepSettings, resolve

    path = Path(args.config) if args.config else None
    text = path.read_text(encoding="utf-8") if path and path.is_file() else ""
    if path and not path.is_file():
        raise CoregError(f"{path}: config file not found")
    resolved = resolve(StepSettings(config_yaml=text, overrides=list(args.overrides),
                                    tracking_uri=args.tracking_uri, model_name=args.model_name))
    return resolved.tracking


def dispatch(args: argparse.Namespace) -> Path | None:
    """Run a command added by :func:`register`; None when ``args.command`` is not one of them."""
    if args.command == "pipeline":
        return _dispatch_pipeline(args)
    if args.command == "promote":
        from coreg.registry import promote_version, write_decision

        decision = promote_version(_tracking_for(args), args.version, force=args.force)
        write_decision(decision, args.out, None)
        print(f"model {decision.model_name} version {decision.version}: "
              f"{'champion' if decision.promoted else 'not promoted'} ({decision.reason})")
        return args.out
    if args.command == "predict":
        from coreg.predict import PredictRequest, predict_folder

        request = PredictRequest(images=args.images, out=args.out, model_uri=args.model_uri,
                                 batch_size=args.batch_size, device=args.device)
        return predict_folder(request, _tracking_for(args))
    return None


def _dispatch_pipeline(args: argparse.Namespace) -> Path:
    if args.pipeline_command == "compile":
        if args.image:
            import os

            os.environ["COREG_IMAGE"] = args.image
        return compile_package(args.out, cluster_options(args))
    params = params_from_args(args)
    if args.pipeline_command == "run":
        from coreg.steps import StepSettings, resolve

        config = resolve(StepSettings(config_yaml=params.config_yaml, overrides=params.overrides)).config
        root = args.pipeline_root or Path(config.output_dir) / "kfp"
        summary = run_local(params, root)
        decision = summary.get("decision") or {}
        if decision:
            print(f"model {decision.get('model_name')} version {decision.get('version')}: "
                  f"{'promoted to champion' if decision.get('promoted') else 'not promoted'} "
                  f"({decision.get('reason')})")
        run_dir = Path(summary["run_dir"])
        for report in sorted(run_dir.glob("evaluate*/**/report.md")):
            print(f"evaluation report: {report}")
        for report in sorted(run_dir.glob("aggregate*/**/quality*.md")):
            print(f"label-quality report: {report}")
        uri = summary["tracking_uri"]
        if uri.startswith("sqlite:"):
            print(f"MLflow UI: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}")
        else:
            print(f"MLflow UI: {uri}")
        return run_dir
    if args.pipeline_command == "submit":
        summary = submit(args, params)
        out = args.out or Path(f"kfp-run-{summary['run_id']}.json")
        print(f"KFP run {summary['run_id']} ({summary['run_name']}) submitted to {args.host}"
              + (f": {summary['state']}" if "state" in summary else ""))
    else:
        summary = schedule(args, params)
        out = args.out or Path(f"kfp-schedule-{summary['recurring_run_id']}.json")
        print(f"recurring run {summary['recurring_run_id']} ({args.name}, cron '{args.cron}') created on {args.host}")
    write_text(out, json.dumps(summary, indent=2) + "\n")
    return out
