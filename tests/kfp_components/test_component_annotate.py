from component_helpers import Interface, assert_thin_wrapper

from components.annotate.component import annotate_op


def test_annotate_interface():
    iface = Interface(annotate_op)
    assert_thin_wrapper(iface)
    assert iface.inputs == {}
    assert iface.outputs == {"annotations": "system.Dataset", "summary": "system.Markdown"}
