"""KFP component: log the model to MLflow, register it and promote it if it beats the champion."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components.image import component


def register(
    config_yaml: str,
    overrides: list,
    data_uri: str,
    class_names: list,
    tracking_uri: str,
    experiment: str,
    model_name: str,
    storage_uri: str,
    kfp_run_id: str,
    run_name: str,
    model: Input[Model],
    evaluation: Input[Dataset],
    decision: Output[Artifact],
    summary: Output[Markdown],
) -> bool:
    """Register a new version (alias challenger), maybe move champion; returns whether it was promoted."""
    from coreg.steps import StepSettings, register_step

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = register_step(settings, model.path, evaluation.path, decision.path, summary.path)
    decision.metadata.update({"promoted": result["promoted"], "version": result["version"],
                              "mlflow_run_id": result["mlflow_run_id"]})
    return bool(result["promoted"])


register_op = component(register)
