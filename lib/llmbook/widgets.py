"""Sliders that switch between pre-drawn frames of a figure, in JupyterLab and in the rendered book.

Each chapter writes a ``draw(ax, **values)`` function and calls :func:`frame_slider` with a
grid of values per slider. Every combination is drawn once, when the cell runs, and kept
as a PNG frame; the sliders are linked to the frames in the browser (``ipywidgets.jslink``
from each slider's ``index`` to the ``selected_index`` of a stack of frames). The links and
the frames are saved with the notebook's widget state, so moving a slider changes the
figure on the book's static pages too: no kernel and no network.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt

from llmbook._checks import check_int, check_real

__all__ = ["frame_slider"]


def _label(value) -> str:
    """A slider label: numbers as ``%g`` (0.1, 16, 1e-05), anything else as ``str``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value)


def _png(fig, dpi: int, colors: int) -> bytes:
    """``fig`` as a PNG of at most ``colors`` colours (a palette image is a few times smaller)."""
    from PIL import Image

    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=dpi)
    image = Image.open(raw).convert("RGB").quantize(colors=colors)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def frame_slider(
    draw: Callable,
    *,
    width: float = 6.4,
    height: float = 3.6,
    dpi: int = 72,
    colors: int = 64,
    start: Mapping | None = None,
    descriptions: Mapping[str, str] | None = None,
    **grids: Sequence,
):
    """One slider per grid that switches, in the browser, between frames drawn in advance.

    Args:
        draw: ``draw(ax, **values)`` draws one frame on a fresh axes; it is called once for
            every combination of the grids' values (their product, in order).
        width, height, dpi: the size of each frame (inches, dots per inch).
        colors: the most colours a frame keeps (a palette PNG; plots need few).
        start: the value each slider starts at (default: each grid's first value).
        descriptions: a slider's label when it should differ from its keyword (``"α"``).
        grids: ``name=[value, ...]``, the values one slider steps through, at least one.

    Returns:
        the ``ipywidgets.VBox`` holding the sliders and the frames; display it. Its ``frames``
        attribute maps each tuple of values (in the grids' order) to that frame's PNG bytes.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise TypeError(f"draw must be callable as draw(ax, **values), got {type(draw).__name__}")
    if not grids:
        raise ValueError("give at least one grid of values, e.g. beta=[0.01, 0.1, 1]")
    width = check_real(width, "width", low=0.0, low_open=True)
    height = check_real(height, "height", low=0.0, low_open=True)
    dpi = check_int(dpi, "dpi", minimum=1)
    colors = check_int(colors, "colors", minimum=2, maximum=256, hint="(the colours of a palette PNG)")
    values = {}
    for name, grid in grids.items():
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
            raise ValueError(f"grid {name!r} must be a non-empty list of values, got {grid!r}")
        if any(v != v for v in grid):
            raise ValueError(f"grid {name!r} holds NaN, a value no slider position can stand for: {list(grid)}")
        if len({_label(v) for v in grid}) != len(grid):
            raise ValueError(f"grid {name!r} has values that print alike: {[_label(v) for v in grid]}")
        same = [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:] if a == b]
        if same:  # True == 1 and 0.0 == -0.0: one frame would serve two positions
            raise ValueError(f"grid {name!r} has values that compare equal, {same[0][0]!r} and {same[0][1]!r}: "
                             "give each slider position a value of its own")
        values[name] = list(grid)
    if start is not None and not isinstance(start, Mapping):
        raise TypeError(f"start must be a dict of grid name -> value, got {start!r}")
    start = dict(start or {})
    unknown = sorted(set(start) - set(values))
    if unknown:
        raise ValueError(f"start names {unknown}, which are not grids; the grids are {sorted(values)}")
    for name, value in start.items():
        if value not in values[name]:
            raise ValueError(f"start[{name!r}] = {value!r} is not in its grid {values[name]}")
    descriptions = dict(descriptions or {})
    unknown = sorted(set(descriptions) - set(values))
    if unknown:
        raise ValueError(f"descriptions names {unknown}, which are not grids; the grids are {sorted(values)}")

    names = list(values)
    frames = {}
    for combination in itertools.product(*values.values()):
        fig, ax = plt.subplots(figsize=(width, height))
        try:
            draw(ax, **dict(zip(names, combination)))
            frames[combination] = _png(fig, dpi, colors)
        finally:
            plt.close(fig)

    first = [values[n].index(start[n]) if n in start else 0 for n in names]
    sliders = [
        widgets.SelectionSlider(options=[(_label(v), i) for i, v in enumerate(values[n])], index=first[level],
                                description=descriptions.get(n, n), continuous_update=True)
        for level, n in enumerate(names)
    ]
    links = []

    def stack(level: int, chosen: tuple):
        if level == len(names):
            return widgets.Image(value=frames[chosen], format="png")
        children = [stack(level + 1, chosen + (v,)) for v in values[names[level]]]
        box = widgets.Stack(children, selected_index=first[level])
        links.append(widgets.jslink((sliders[level], "index"), (box, "selected_index")))
        return box

    panel = widgets.VBox([widgets.HBox(sliders), stack(0, ())])
    panel.frames, panel.links = frames, links
    return panel
