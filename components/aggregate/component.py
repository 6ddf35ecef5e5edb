"""KFP component: turn annotations into candidate label sets (``coreg.aggregate``)."""

from kfp.dsl import Dataset, Input, Markdown, Output

from components.image import component


def aggregate(
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
    annotations: Input[Dataset],
    candidates: Output[Dataset],
    summary: Output[Markdown],
):
    """Aggregate an annotate folder (made by this run or imported) into the aggregate folder."""
    from coreg.steps import StepSettings, aggregate_step, describe

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = aggregate_step(settings, annotations.path, annotations.uri, candidates.path)
    describe("aggregate", result, candidates, summary.path)


aggregate_op = component(aggregate)
