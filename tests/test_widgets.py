import io
import itertools

import ipywidgets as widgets
import matplotlib
import numpy as np
import pytest
from PIL import Image

from llmbook.widgets import frame_slider

matplotlib.use("Agg")


def draw(ax, beta, p=1.0):
    x = np.linspace(0, 1, 20)
    ax.plot(x, np.exp(-x / beta) * p)
    ax.set_title(f"beta={beta:g}, p={p:g}")


def shown(panel, indices):
    """The frame the browser shows when the sliders' indices are ``indices``: follow the stacks as jslink would."""
    node = panel.children[1]
    for index in indices:
        assert isinstance(node, widgets.Stack)
        node = node.children[index]
    assert isinstance(node, widgets.Image) and node.format == "png"
    return node.value


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_every_combination_is_drawn_once_and_the_stacks_hold_it_where_the_sliders_point():
    calls = []
    grids = {"beta": [0.1, 0.3, 1.0], "p": [0.5, 1.0]}
    panel = frame_slider(lambda ax, **v: (calls.append(v), draw(ax, **v)), **grids, start={"beta": 0.3})
    assert calls == [dict(beta=b, p=p) for b, p in itertools.product(*grids.values())]
    sliders = panel.children[0].children
    assert [s.description for s in sliders] == ["beta", "p"]
    assert [list(s.options) for s in sliders] == [[("0.1", 0), ("0.3", 1), ("1", 2)], [("0.5", 0), ("1", 1)]]
    assert [s.index for s in sliders] == [1, 0]
    for (i, b), (j, p) in itertools.product(enumerate(grids["beta"]), enumerate(grids["p"])):
        assert shown(panel, (i, j)) == panel.frames[b, p]
    assert len({frame for frame in panel.frames.values()}) == 6  # six different pictures
    # A frame is the figure draw() makes: the same pixels as matplotlib's own PNG of it, up to the palette.
    fig, ax = matplotlib.pyplot.subplots(figsize=(6.4, 3.6))
    draw(ax, beta=1.0, p=0.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    matplotlib.pyplot.close(fig)
    ours, theirs = pixels(panel.frames[1.0, 0.5]).astype(int), pixels(buf.getvalue()).astype(int)
    assert ours.shape == theirs.shape == (259, 460, 3)
    assert np.abs(ours - theirs).mean() < 2.0


def test_each_slider_is_jslinked_to_every_stack_of_its_level():
    panel = frame_slider(draw, beta=[0.1, 1.0, 3.0], p=[0.5, 1.0])
    sliders = panel.children[0].children
    outer = panel.children[1]
    inner = list(outer.children)
    links = {(link.source[0].model_id, link.source[1], link.target[0].model_id, link.target[1])
             for link in panel.links}
    want = {(sliders[0].model_id, "index", outer.model_id, "selected_index")}
    want |= {(sliders[1].model_id, "index", stack.model_id, "selected_index") for stack in inner}
    assert links == want and all(type(link).__name__ == "Link" for link in panel.links)  # jslink's, in the browser
    assert outer.selected_index == 0 and all(stack.selected_index == 0 for stack in inner)


def test_a_frame_is_small():
    panel = frame_slider(draw, beta=[0.1, 1.0])
    assert all(len(frame) < 20_000 for frame in panel.frames.values())  # a palette PNG of a line plot


def test_bad_grids_are_named():
    with pytest.raises(TypeError, match="draw must be callable"):
        frame_slider("draw", beta=[1.0])
    with pytest.raises(ValueError, match="at least one grid"):
        frame_slider(draw)
    with pytest.raises(ValueError, match="grid 'beta' must be a non-empty list"):
        frame_slider(draw, beta=[])
    with pytest.raises(ValueError, match="grid 'beta' must be a non-empty list"):
        frame_slider(draw, beta=0.1)
    with pytest.raises(ValueError, match="print alike"):
        frame_slider(draw, beta=[0.1, 0.1000001])
    with pytest.raises(ValueError, match=r"start\['beta'\] = 2 is not in its grid"):
        frame_slider(draw, beta=[0.1, 1.0], start={"beta": 2})
    with pytest.raises(ValueError, match=r"start names \['gamma'\]"):
        frame_slider(draw, beta=[0.1, 1.0], start={"gamma": 2})
    with pytest.raises(ValueError, match=r"descriptions names \['gamma'\]"):
        frame_slider(draw, beta=[0.1, 1.0], descriptions={"gamma": "γ"})
