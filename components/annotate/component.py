"""KFP component: label the images with the configured annotators (``coreg.annotate``)."""

from kfp.dsl import Dataset, Markdown, Output

from components.image import component


def annotate(
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
    annotations: Output[Dataset],
    summary: Output[Markdown],
):
    """Annotate the data set; output the annotate stage folder and a Markdown summary."""
    from coreg.steps import StepSettings, annotate_step, describe

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = annotate_step(settings, annotations.path)
    describe("annotate", result, annotations, summary.path)


annotate_op = component(annotate)
