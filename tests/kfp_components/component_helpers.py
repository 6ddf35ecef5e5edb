"""Helpers for the component tests: read a component's interface from its compiled spec."""

from __future__ import annotations

import inspect

COMMON_PARAMS = {"config_yaml", "overrides", "data_uri", "class_names", "tracking_uri", "experiment", "model_name",
                 "storage_uri", "kfp_run_id", "run_name"}


class Interface:
    def __init__(self, op) -> None:
        spec = op.pipeline_spec
        comp = next(iter(spec.components.values()))
        executor = next(iter(spec.deployment_spec.fields["executors"].struct_value.fields.values()))
        container = executor.struct_value.fields["container"].struct_value.fields
        self.image = container["image"].string_value
        self.command = " ".join(v.string_value for v in container["command"].list_value.values)
        self.params = set(comp.input_definitions.parameters)
        self.inputs = {k: v.artifact_type.schema_title for k, v in comp.input_definitions.artifacts.items()}
        self.outputs = {k: v.artifact_type.schema_title for k, v in comp.output_definitions.artifacts.items()}
        self.output_params = set(comp.output_definitions.parameters)
        self.source = inspect.getsource(op.python_func)


def assert_thin_wrapper(iface: Interface) -> None:
    """Project image, nothing installed at run time, coreg imported inside the function only."""
    from components.image import IMAGE

    assert iface.image == IMAGE
    assert "pip install" not in iface.command
    assert iface.params >= COMMON_PARAMS
    body = iface.source.split('"""', 2)[-1]
    assert "from coreg.steps import" in body
