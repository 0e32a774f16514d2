"""Take out of executed chapters what a live reader needed and a saved notebook should not keep.

Usage: python scripts/clean_notebooks.py chapters/*.ipynb        (`make execute` runs it)
       python scripts/clean_notebooks.py --check chapters/*.ipynb   (changes nothing)

A progress bar is for the person watching a cell run. Saved, it leaves in the raw
``.ipynb`` (what JupyterLab and a code host show) dozens of ``\\r``-separated fragments,
terminal escape codes, or a widget view and its saved state. This removes:

- standard-error streams made only of progress-bar text (tqdm's ``12%|██ | 3/25 [...]``
  lines, its cursor-up codes, and llmbook's one-line notices of a first model load);
- widget views whose fallback text is a progress bar (transformers' "Loading weights"
  bars, drawn as widgets in a notebook), and the saved widget state that only they used.

Anything else on standard error (a warning, a traceback, a path) is not removed: it is
reported, naming the notebook and the cell, and the script exits 1, so that its cause is
fixed where it arises rather than hidden. Widget state that a remaining view uses (the
chapters' sliders) is kept.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# One redraw of a tqdm bar: "desc:  12%|████      | 3/25 [00:02<00:15,  1.4it/s, loss=0.1]"
PROGRESS_LINE = re.compile(r"^.*\d+%\|.*\|\s*\d+(\.\d+)?[kMG]?/\d+(\.\d+)?[kMG]?\s*\[.*\]\s*$")
CURSOR_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor-up between nested bars
# llmbook.models says so on standard error when it converts the packaged weights (first load only).
NOTICE = re.compile(r"^llmbook: (first load, converting .*|\s*step \d of \d, .*|converted in \d+ s; later loads read the cache)$")
MODEL_REF = re.compile(r"IPY_MODEL_([0-9a-f]{32})")


def is_progress_text(text: str) -> bool:
    """Whether every piece of ``text`` (split at ``\\r`` and newlines) is progress-bar output."""
    pieces = (CURSOR_CODES.sub("", p).strip() for p in re.split(r"[\r\n]", text))
    return all(not p or PROGRESS_LINE.match(p) or NOTICE.match(p) for p in pieces)


def _is_progress_view(output) -> bool:
    data = output.get("data", {})
    return WIDGET_VIEW in data and is_progress_text("".join(data.get("text/plain", "")))


def _used_models(views: list[str], state: dict) -> set[str]:
    """The widget models connected to ``views``: their children, layouts and styles, and the
    models that refer to any of those (a ``jslink`` between a slider and its frames)."""
    neighbours = {m: set() for m in state}
    for model, entry in state.items():
        for other in MODEL_REF.findall(str(entry.get("state", {}))):
            if other in neighbours:
                neighbours[model].add(other)
                neighbours[other].add(model)
    seen, todo = set(), [v for v in views if v in neighbours]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            todo.extend(neighbours[model] - seen)
    return seen


def clean(nb) -> tuple[int, list[str]]:
    """Remove progress output from ``nb`` in place; returns (outputs removed, problems left).

    A problem is a standard-error stream that is not progress-bar text, named by its code
    cell's index (counted from 0, as nbval names cells) and its first line.
    """
    removed, problems, views = 0, [], []
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for index, cell in enumerate(code_cells):
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = "".join(output.get("text", ""))
                if is_progress_text(text):
                    removed += 1
                    continue
                first = next((line for line in text.splitlines() if line.strip()), "")
                problems.append(f"code cell {index}: standard error: {first.strip()[:160]}")
            elif _is_progress_view(output):
                removed += 1
                continue
            elif WIDGET_VIEW in output.get("data", {}):
                views.append(output["data"][WIDGET_VIEW]["model_id"])
            kept.append(output)
        cell["outputs"] = kept
    widgets = nb.metadata.get("widgets", {})
    if WIDGET_STATE in widgets:
        state = widgets[WIDGET_STATE].get("state", {})
        used = _used_models(views, state)
        for model in [m for m in state if m not in used]:
            del state[model]
            removed += 1
        if not state:
            del nb.metadata["widgets"]
    return removed, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true",
                        help="report what would be removed, write nothing (exit 1 if anything)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"notebooks: {path} is not a notebook file (*.ipynb)")
        nb = nbformat.read(path, as_version=4)
        removed, problems = clean(nb)
        for problem in problems:
            print(f"{path}: {problem} (fix its cause; it is not removed)", file=sys.stderr)
        status = 1 if problems or (args.check and removed) else status
        if removed and not args.check:
            nbformat.write(nb, path)
        verb = "would remove" if args.check else "removed"
        print(f"{path}: {verb} {removed} progress output(s)" if removed else f"{path}: clean")
    return status


if __name__ == "__main__":
    sys.exit(main())
