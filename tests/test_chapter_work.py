"""scripts/chapter_work.py: each cell's counts come from that cell, and the page adds them up."""

import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import chapter_work  # noqa: E402


def test_each_code_cell_gets_the_work_it_did(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "llmbook", "display_name": "llmbook"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"),
                nbformat.v4.new_code_cell("import torch\na, b = torch.ones(3, 5), torch.ones(5, 7)"),
                nbformat.v4.new_code_cell(""),  # never sent to the kernel
                nbformat.v4.new_code_cell("c = a @ b"),
                nbformat.v4.new_code_cell("for _ in range(3):\n    torch.relu(a @ b)"),
                nbformat.v4.new_code_cell("x = 1")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    result = chapter_work.count_one(str(path), threads=1)
    assert result["error"] is None
    cells = {c["cell"]: c for c in result["cells"]}
    assert sorted(cells) == [0, 2, 3, 4]
    product = 2 * 3 * 5 * 7
    assert (cells[2]["flops"], cells[2]["products"], cells[2]["ops"]) == (product, 1, 1)
    assert (cells[3]["flops"], cells[3]["products"], cells[3]["ops"]) == (3 * product, 3, 6)
    assert (cells[4]["flops"], cells[4]["ops"]) == (0, 0)
    assert cells[3]["first_line"] == "for _ in range(3):"


MACHINE = {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0+cpu", "date": "2026-01-01"}


def test_the_page_splits_a_time_into_arithmetic_calls_and_the_rest():
    reference = {"measurements": {"training step": {"flops": 10**11, "ops": 10, "seconds": 1.0}},
                 "flops_per_s": 1e11, "per_op_s": 1e-5, "threads": 2, "kernels": "AVX2", "machine": MACHINE}
    cells = [{"cell": 0, "first_line": "train()", "flops": 3 * 10**12, "products": 9, "ops": 2 * 10**6},
             {"cell": 1, "first_line": "plot()", "flops": 0, "products": 0, "ops": 0}]
    work = {"reference": reference, "chapters": {"ch.ipynb": {"cells": cells, "code": "c0de"}}}
    times = {"ch.ipynb": {"seconds": 80.0, "machine": MACHINE, "code": "c0de", "profile": [
        {"cell": 0, "first_line": "train()", "seconds": 70.0},
        {"cell": 1, "first_line": "something else()", "seconds": 5.0}]}}
    page = chapter_work.render(work, ["ch.ipynb"], times)
    # 3000 GFLOP at 100 GFLOP/s = 30 s; 2 M calls at 10 µs = 20 s; 80 - 30 - 20 = 30 s other
    assert "| ch | 1 min 20.0 s | 3,000 | 2.00 M | 30.0 s | 20.0 s | 30.0 s |" in page
    assert "| **all** | **1 min 20.0 s** | **3,000** | **2.00 M** | **30.0 s** | **20.0 s** | **30.0 s** |" in page
    assert "arithmetic 38%, operator calls 25%, other 38%" in page
    assert "| ch | 0 | `train()` | 70.0 | 3,000 | 43 | 2.00 M | 50.0 s |" in page
    assert "something else" not in page  # a cell whose code changed since it was timed


def test_times_from_another_machine_are_not_split_by_this_ones_rates():
    reference = {"measurements": {}, "flops_per_s": 1e11, "per_op_s": 1e-5, "threads": 2, "kernels": "AVX2",
                 "machine": MACHINE}
    cells = [{"cell": 0, "first_line": "train()", "flops": 3 * 10**12, "products": 9, "ops": 2 * 10**6}]
    work = {"reference": reference, "chapters": {"ch.ipynb": {"cells": cells, "code": "c0de"}}}
    times = {"ch.ipynb": {"seconds": 80.0, "machine": {**MACHINE, "cpu": "Another CPU"}, "code": "c0de",
                          "profile": [{"cell": 0, "first_line": "train()", "seconds": 70.0}]}}
    page = chapter_work.render(work, ["ch.ipynb"], times)
    assert "| ch | — | 3,000 | 2.00 M | 30.0 s | 20.0 s | — |" in page
    assert "`train()`" not in page


def test_times_of_other_code_are_not_split_by_these_counts():
    """A chapter or llmbook changed between counting and timing: the counts do not explain the time."""
    reference = {"measurements": {}, "flops_per_s": 1e11, "per_op_s": 1e-5, "threads": 2, "kernels": "AVX2",
                 "machine": MACHINE}
    cells = [{"cell": 0, "first_line": "train()", "flops": 3 * 10**12, "products": 9, "ops": 2 * 10**6}]
    work = {"reference": reference, "chapters": {"ch.ipynb": {"cells": cells, "code": "c0de"}}}
    for code in ("c0ffee", None):
        times = {"ch.ipynb": {"seconds": 80.0, "machine": MACHINE, "code": code,
                              "profile": [{"cell": 0, "first_line": "train()", "seconds": 70.0}]}}
        page = chapter_work.render(work, ["ch.ipynb"], times)
        assert "| ch | — | 3,000 | 2.00 M | 30.0 s | 20.0 s | — |" in page
        assert "`train()`" not in page


def test_the_code_fingerprint_follows_the_chapters_code_cells_not_its_outputs(tmp_path, monkeypatch):
    import chapter_times

    (tmp_path / "lib" / "llmbook").mkdir(parents=True)
    (tmp_path / "lib" / "llmbook" / "m.py").write_text("x = 1\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T"), nbformat.v4.new_code_cell("a = 1")])
    nbformat.write(nb, tmp_path / "ch.ipynb")
    monkeypatch.setattr(chapter_times, "ROOT", tmp_path)
    first = chapter_times.code_fingerprint("ch.ipynb")
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[0].source = "# Another title"
    nbformat.write(nb, tmp_path / "ch.ipynb")
    assert chapter_times.code_fingerprint("ch.ipynb") == first  # outputs and prose: the same code
    nb.cells[1].source = "a = 2"
    nbformat.write(nb, tmp_path / "ch.ipynb")
    changed_cell = chapter_times.code_fingerprint("ch.ipynb")
    (tmp_path / "lib" / "llmbook" / "m.py").write_text("x = 2\n")
    changed_lib = chapter_times.code_fingerprint("ch.ipynb")
    assert len({first, changed_cell, changed_lib}) == 3
