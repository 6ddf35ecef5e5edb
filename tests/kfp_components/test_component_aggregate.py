from component_helpers import Interface, assert_thin_wrapper

from components.aggregate.component import aggregate_op


def test_aggregate_interface():
    iface = Interface(aggregate_op)
    assert_thin_wrapper(iface)
    assert iface.inputs == {"annotations": "system.Dataset"}
    assert iface.outputs == {"candidates": "system.Dataset", "summary": "system.Markdown"}
