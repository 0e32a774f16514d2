"""ipywidgets controls that redraw a figure, for exploring a chapter in JupyterLab.

Each chapter writes a ``draw(ax, **values)`` function and calls :func:`slider_panel`;
the book shows the figure for the initial values (widgets need a live kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt

__all__ = ["slider_panel"]


def slider_panel(draw: Callable, *, width: float = 6.4, height: float = 3.6, **controls):
    """Sliders (or any ipywidgets) that call ``draw(ax, **values)`` on a fresh axes on each change.

    Args:
        draw: draws on the given axes from the current control values.
        controls: ``name=widget``, e.g. ``r=widgets.IntSlider(8, 1, 64)``.

    Returns:
        the ``ipywidgets.VBox`` holding the controls and the figure; display it.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise TypeError(f"draw must be callable as draw(ax, **values), got {type(draw).__name__}")
    if not controls:
        raise ValueError("give at least one control, e.g. r=ipywidgets.IntSlider(...)")
    output = widgets.Output()

    def redraw(_=None):
        with output:
            output.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(width, height))
            draw(ax, **{name: control.value for name, control in controls.items()})
            plt.show()

    for name, control in controls.items():
        if not getattr(control, "description", ""):
            control.description = name
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())), output])
