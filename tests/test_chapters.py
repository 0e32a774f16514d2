"""Static checks of the committed chapters: what the book renders must be what the code does."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from book_toc import toc_files  # noqa: E402

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def test_there_are_chapters():
    assert CHAPTERS


def test_every_chapter_is_in_the_toc():
    listed = set(toc_files())
    for path in CHAPTERS:
        assert f"chapters/{path.stem}" in listed, f"{path.name} is missing from _toc.yml"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_committed_executed_top_to_bottom(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "re-execute the notebook top to bottom in one kernel"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"committed error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_checks_figures_and_folded_solutions(path):
    nb = json.loads(path.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert sum("assert" in src for src in code) >= 5, "each claim needs an assertion next to it"
    assert any(src.startswith("# NBVAL_CHECK_OUTPUT") for src in code)
    images = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
              if "image/png" in o.get("data", {})]
    assert images, "a chapter shows at least one figure"
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## Exercises" in text and "Learning goals" in text and "## Summary" in text
    solutions = [c for c in nb["cells"] if "hide-cell" in c.get("metadata", {}).get("tags", [])]
    assert solutions and all(c["cell_type"] == "code" and c["outputs"] for c in solutions), \
        "solutions are folded code cells that were executed"
    # The prose of a solution is folded too: a dropdown, never an open paragraph with the answer.
    import re

    prose = [c for c in nb["cells"] if c["cell_type"] == "markdown" and "Solution" in "".join(c["source"])[:40]]
    assert len(prose) == len(solutions), "each folded solution code cell has its folded prose"
    for cell in prose:
        assert re.match(r"```\{admonition\} Solution \d+\n:class: dropdown\n", "".join(cell["source"])), \
            f"solution prose must be a dropdown: {''.join(cell['source'])[:60]!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_imports_the_package_not_paths(path):
    src = path.read_text()
    assert "sys.path" not in src
    assert "from llmbook" in src or "import llmbook" in src


def _code(path):
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", CHAPTERS + sorted((ROOT / "lib" / "llmbook").glob("*.py")), ids=lambda p: p.stem)
def test_nothing_autocasts_to_a_half_dtype(path):
    # bf16 autocast on a CPU without native bf16 runs 30-90x slower than float32: the book
    # computes in the model's dtype (float32 unless LLMBOOK_DTYPE asks otherwise).
    source = _code(path) if path.suffix == ".ipynb" else path.read_text()
    assert "autocast(" not in source


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_model_comparisons_take_their_tolerance_from_the_table(path):
    # A hand-picked float32 tolerance on a whole model's outputs is tuned to one CPU's kernels;
    # llmbook.utils.tolerance gives it from the dtype and the kind of computation.
    import re

    for call in re.findall(r"assert_close\((?:[^()]|\([^()]*\))*\)", _code(path)):
        picked = re.search(r"rtol=([0-9.e-]+)", call)
        if picked and float(picked.group(1)) != 0 and ("logits" in call or "loss" in call):
            pytest.fail(f"{path.stem}: {' '.join(call.split())[:120]} picks its own tolerance")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_call_the_package_instead_of_rewriting_it(path):
    # Batched answering (left padding, eval mode, decoding) is llmbook.sampling.generate_answers,
    # positions from a mask are llmbook.sampling.position_ids: a chapter that needs them calls them.
    code = _code(path)
    for written, home in (("padding_side =", "sampling.generate_answers"), ("was_training", "utils.eval_mode"),
                          ("attention_mask.cumsum(", "sampling.position_ids")):
        assert written not in code, f"{path.stem} writes {written!r} itself; call llmbook's {home}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_tables_are_rendered_not_printed(path):
    # A printed DataFrame (to_string) is a wide block of text that the page cuts off; display() renders a table.
    assert ".to_string()" not in _code(path), f"{path.stem}: display the DataFrame instead of printing it"


PAGE_WIDTH = 88  # columns of code the book's page shows without a scroll bar (pyproject's [tool.ruff])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(path):
    nb = json.loads(path.read_text())
    wide = [f"cell {i}: {line[:60]}..."
            for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines() if len(line) > PAGE_WIDTH]
    assert not wide, (f"{len(wide)} code lines are wider than {PAGE_WIDTH} columns (`make format`, "
                      f"then wrap the strings and comments it leaves):\n" + "\n".join(wide[:10]))
