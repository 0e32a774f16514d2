"""scripts/clean_notebooks.py: progress output leaves a saved notebook, everything else stays."""

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import clean_notebooks  # noqa: E402

VIEW = "application/vnd.jupyter.widget-view+json"
STATE = "application/vnd.jupyter.widget-state+json"
BAR = "\rtrain:  40%|████      | 2/5 [00:04<00:06,  2.01s/it, loss=0.31]"


def _id(n: int) -> str:
    return f"{n:032x}"


def _notebook(*cells, state=None):
    nb = nbformat.v4.new_notebook()
    for outputs in cells:
        cell = nbformat.v4.new_code_cell("x = 1")
        cell.outputs = outputs
        nb.cells.append(cell)
    if state is not None:
        nb.metadata["widgets"] = {STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


def _stream(text, name="stderr"):
    return nbformat.v4.new_output("stream", name=name, text=text)


def _view(model, text):
    return nbformat.v4.new_output("display_data", data={VIEW: {"model_id": model}, "text/plain": text})


def _model(name, **refs):
    return {"model_name": name, "state": {k: f"IPY_MODEL_{v}" for k, v in refs.items()}}


@pytest.mark.parametrize("text", [
    BAR,
    BAR + "\n",
    "\rprobe:   0%|          | 0/3 [00:00<?, ?it/s]\x1b[A\n\x1b[A",  # nested bars move the cursor up
    "\rlengths: 100%|██████████| 4/4 [00:20<00:00,  5.1s/it]\n",
    "llmbook: first load, converting SmolLM2-135M-Instruct.Q4_1.gguf into the model cache x ...\n",
    "\x1b[A",
    "",
])
def test_progress_text_is_recognised(text):
    assert clean_notebooks.is_progress_text(text)


@pytest.mark.parametrize("text", [
    "x.py:3: FutureWarning: `a` is deprecated\n",
    "Traceback (most recent call last):\n",
    BAR + "\nUserWarning: something\n",  # a bar and a warning in one stream: kept, reported
    "40% of the answers changed\n",
])
def test_other_text_is_not_progress(text):
    assert not clean_notebooks.is_progress_text(text)


def test_clean_removes_bars_and_their_widgets_and_keeps_everything_else():
    slider, frames, link, layout = _id(1), _id(2), _id(3), _id(4)
    hbox, bar, style = _id(10), _id(11), _id(12)
    stale_box, stale_bar = _id(20), _id(21)   # a progress bar whose view is already gone
    state = {
        slider: _model("SelectionSliderModel", layout=layout),
        layout: _model("LayoutModel"),
        frames: _model("StackModel"),
        link: _model("LinkModel", source=slider, target=frames),  # nothing refers to a link
        hbox: _model("HBoxModel", child=bar),
        bar: _model("FloatProgressModel", style=style),
        style: _model("ProgressStyleModel"),
        stale_box: _model("HBoxModel", child=stale_bar),
        stale_bar: _model("FloatProgressModel"),
    }
    nb = _notebook(
        [_stream("loss 0.3\n", "stdout"), _stream(BAR), _stream(BAR + "\n")],
        [_view(hbox, "Loading weights:   0%|          | 0/20 [00:00<?, ?it/s]"),
         _view(slider, "VBox(children=(SelectionSlider(...)))")],
        state=state,
    )
    removed, problems = clean_notebooks.clean(nb)
    assert problems == []
    assert [o.get("text") for o in nb.cells[0].outputs] == ["loss 0.3\n"]
    assert [o["data"][VIEW]["model_id"] for o in nb.cells[1].outputs] == [slider]
    assert set(nb.metadata["widgets"][STATE]["state"]) == {slider, layout, frames, link}
    assert removed == 2 + 1 + 5


def test_clean_reports_what_is_not_progress_and_keeps_it():
    warning = _stream("/site/x.py:3: FutureWarning: `a` is deprecated\n")
    nb = _notebook([], [_stream(BAR), warning])
    removed, problems = clean_notebooks.clean(nb)
    assert removed == 1 and nb.cells[1].outputs == [warning]
    assert problems == ["code cell 1: standard error: /site/x.py:3: FutureWarning: `a` is deprecated"]


def test_widget_state_with_nothing_left_is_dropped():
    nb = _notebook([_view(_id(1), BAR.strip())], state={_id(1): _model("FloatProgressModel")})
    clean_notebooks.clean(nb)
    assert "widgets" not in nb.metadata and nb.cells[0].outputs == []


def test_command_line(tmp_path, capsys):
    path = tmp_path / "a.ipynb"
    nbformat.write(_notebook([_stream(BAR)]), path)
    assert clean_notebooks.main(["--check", str(path)]) == 1      # would remove: the file stays
    assert "would remove 1" in capsys.readouterr().out
    assert nbformat.read(path, as_version=4).cells[0].outputs
    assert clean_notebooks.main([str(path)]) == 0
    assert nbformat.read(path, as_version=4).cells[0].outputs == []
    assert clean_notebooks.main(["--check", str(path)]) == 0
    nbformat.write(_notebook([_stream("Traceback (most recent call last):\n")]), path)
    assert clean_notebooks.main([str(path)]) == 1
    assert "code cell 0: standard error: Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        clean_notebooks.main([str(tmp_path / "missing.ipynb")])
    assert "notebooks:" in capsys.readouterr().err



def test_the_first_loads_step_lines_count_as_progress(capsys):
    """What llmbook.models prints while it builds the cache is taken out of a saved chapter."""
    import time

    from llmbook import models

    models._step(2, "reading the tokenizer", time.perf_counter())
    text = capsys.readouterr().err
    assert text.startswith("llmbook:") and clean_notebooks.is_progress_text(text)
    assert not clean_notebooks.is_progress_text(text + "UserWarning: something else\n")
