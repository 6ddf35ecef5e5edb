from component_helpers import Interface, assert_thin_wrapper

from components.train.component import train_op


def test_train_interface():
    iface = Interface(train_op)
    assert_thin_wrapper(iface)
    assert iface.inputs == {"candidates": "system.Dataset"}
    assert iface.outputs == {"model": "system.Model", "summary": "system.Markdown"}
