import base64

from component_helpers import Interface, assert_thin_wrapper

from components.evaluate.component import evaluate_op
from coreg.steps import markdown_to_html


def test_evaluate_interface():
    iface = Interface(evaluate_op)
    assert_thin_wrapper(iface)
    assert iface.inputs == {"model": "system.Model", "annotations": "system.Dataset", "candidates": "system.Dataset"}
    assert iface.outputs == {"evaluation": "system.Dataset", "metrics": "system.Metrics",
                             "confusion": "system.ClassificationMetrics", "report": "system.HTML"}


def test_report_html_embeds_tables_and_figures(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "cm.png").write_bytes(png)
    html = markdown_to_html("# Title\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\n![cm](cm.png)\n", tmp_path)
    assert "<h1>Title</h1>" in html
    assert "<th>a</th>" in html and "<td><b>1</b></td>" in html and "<code>x</code>" in html
    assert base64.b64encode(png).decode() in html
