"""scripts/chapter_times.py: the per-cell profile that `make times` writes."""

import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import chapter_times  # noqa: E402


def test_chapter_profile_ranks_cells_by_their_recorded_time():
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# Title"))
    for source, began, ended in [("# NBVAL_CHECK_OUTPUT\nimport torch", "00.0", "01.0"),
                                 ("train(model)", "01.0", "07.0"), ("plt.show()", "07.0", "10.0"),
                                 ("x = 1", "10.0", "10.5"), ("never_ran()", None, None)]:
        cell = nbformat.v4.new_code_cell(source)
        if began:
            cell.metadata["execution"] = {"iopub.execute_input": f"2026-01-01T00:00:{began}00Z",
                                          "shell.execute_reply": f"2026-01-01T00:00:{ended}00Z"}
        nb.cells.append(cell)
    profile = chapter_times.cell_profile(nb)
    assert [(c["cell"], c["first_line"], c["seconds"]) for c in profile] == [
        (1, "train(model)", 6.0), (2, "plt.show()", 3.0), (0, "import torch", 1.0)]
    assert profile[0]["share"] == round(6 / 10.5, 3)
