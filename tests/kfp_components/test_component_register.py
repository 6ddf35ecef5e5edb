from component_helpers import Interface, assert_thin_wrapper

from components.register.component import register_op
from coreg.registry import PromotionDecision


def test_register_interface():
    iface = Interface(register_op)
    assert_thin_wrapper(iface)
    assert iface.inputs == {"model": "system.Model", "evaluation": "system.Dataset"}
    assert iface.outputs == {"decision": "system.Artifact", "summary": "system.Markdown"}
    assert iface.output_params == {"Output"}


def test_decision_markdown_names_both_figures():
    decision = PromotionDecision(model_name="m", version="3", metric="accuracy", margin=0.01, challenger_value=0.8,
                                 champion_version="2", champion_value=0.795, promoted=False,
                                 reason="does not beat", decided_at="now")
    text = decision.to_markdown()
    assert "not promoted" in text and "0.8000" in text and "0.7950" in text and "version 2" in text
