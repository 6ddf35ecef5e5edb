"""KFP component: train Co-Reg on a multi-node Kubeflow Trainer TrainJob (``coreg.trainjob``).

It replaces the ``train`` task when the pipeline is compiled with ``train_nodes > 1``: same
inputs and outputs, but the training runs on ``trainjob["num_nodes"]`` GPU nodes under torchrun,
and this small CPU pod only creates the TrainJob, follows it and hands the train folder on.
"""

from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.image import component


def train_trainjob(
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
    trainjob: dict,
    candidates: Input[Dataset],
    model: Output[Model],
    summary: Output[Markdown],
):
    """Create (or attach to) the run's TrainJob, wait for it, output its train folder as a Model artifact."""
    from coreg.steps import StepSettings, describe
    from coreg.trainjob import launch_step

    settings = StepSettings(config_yaml=config_yaml, overrides=overrides, data_uri=data_uri,
                            class_names=class_names, tracking_uri=tracking_uri, experiment=experiment,
                            model_name=model_name, storage_uri=storage_uri, kfp_run_id=kfp_run_id,
                            run_name=run_name)
    result = launch_step(settings, trainjob, candidates.path, model.path)
    model.metadata["framework"] = "pytorch"
    model.metadata["trainjob"] = result["trainjob"]
    describe("train", result, model, summary.path)


train_trainjob_op = component(train_trainjob)
