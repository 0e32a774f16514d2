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


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_imports_the_package_not_paths(path):
    src = path.read_text()
    assert "sys.path" not in src
    assert "from llmbook" in src or "import llmbook" in src
