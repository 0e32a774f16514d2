import ipywidgets as widgets
import matplotlib
import pytest

from llmbook.widgets import slider_panel

matplotlib.use("Agg")


def test_panel_redraws_with_the_current_values():
    seen = []
    r = widgets.IntSlider(value=4, min=1, max=64)
    panel = slider_panel(lambda ax, r, alpha: seen.append((r, alpha)), r=r, alpha=widgets.FloatSlider(value=8.0))
    r.value = 16
    assert seen == [(4, 8.0), (16, 8.0)]
    assert isinstance(panel, widgets.VBox) and r.description == "r"


def test_panel_needs_a_control():
    with pytest.raises(ValueError, match="control"):
        slider_panel(lambda ax: None)
