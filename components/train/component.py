"""KFP component: train Co-Reg on the candidate sets (``coreg.train``); the pipeline gives it a GPU."""

from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.image import component


def train(
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
    candidates: Input[Dataset],
    model: Output[Model],
    summary: Output[Markdown],
):
    """Train; output the train folder (model.pt, history.json, checkpoints) as a Model artifact."""
    from coreg.steps import StepSettings, describe, train_step

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = train_step(settings, candidates.path, candidates.uri, model.path)
    model.metadata["framework"] = "pytorch"
    describe("train", result, model, summary.path)


train_op = component(train)
