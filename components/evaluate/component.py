"""KFP component: evaluate the trained model on the test split (``coreg.evaluate``)."""

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.image import component


def evaluate(
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
    annotations: Input[Dataset],
    candidates: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Evaluate; output the folder, scalar metrics, the confusion matrix and the HTML report.

    ``candidates`` is not read here directly: it makes the launcher download the aggregate
    folder to the path the train folder's lineage names, which evaluate follows.
    """
    from pathlib import Path

    from coreg.steps import StepSettings, describe, evaluate_step, markdown_to_html

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = evaluate_step(settings, model.path, annotations.path, annotations.uri, evaluation.path)
    values = result["metrics"]["model"]
    for key in ("accuracy", "n"):
        if values.get(key) is not None:
            metrics.log_metric(key, float(values[key]))
    for key, value in (result["metrics"].get("zero_shot") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(f"zero_shot_{key}", float(value))
    if values.get("confusion_matrix"):
        confusion.log_confusion_matrix(list(values["per_class_accuracy"]), values["confusion_matrix"])
    folder = Path(evaluation.path)
    Path(report.path).write_text(markdown_to_html((folder / "report.md").read_text(), folder))
    describe("evaluate", result, evaluation, None)


evaluate_op = component(evaluate)
