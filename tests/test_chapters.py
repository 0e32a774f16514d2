"""Static checks of the committed chapters: what the book renders must be what the code does."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
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
              if "image/svg+xml" in o.get("data", {})]
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
def test_chapter_names_the_projects_kernel_which_setup_registers(path):
    """Opened from any Jupyter or editor, a chapter asks for the project's environment."""
    spec = nbformat.read(path, as_version=4).metadata.kernelspec
    assert (spec.name, spec.display_name) == ("llmbook", "Python (llmbook)")
    makefile = (ROOT / "Makefile").read_text()
    assert f'--name {spec.name} --display-name "{spec.display_name}"' in makefile


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


# --- no assertion on the clock (a busy machine must not fail a chapter) -------------------

import ast  # noqa: E402

# Calls whose result is a time; "seconds" is the key under which train() keeps each step's time.
CLOCKS = {"time_interleaved", "time_call", "perf_counter", "perf_counter_ns", "monotonic",
          "process_time", "time"}


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _root_name(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def clock_assertions(source: str) -> list[str]:
    """The ``assert`` statements of ``source`` whose test depends on a measured time.

    The statements are followed in order. A name becomes timed when it is assigned (or
    appended to, or looped over) from an expression that calls a clock (``CLOCKS``, or a
    function defined earlier that does), reads a ``["seconds"]`` entry, or uses a timed
    name; assigned anything else, it is untimed again (chapters reuse short names such as
    ``t``). A loop's body is followed twice, so that what its second pass sees counts.
    """
    timed, clock_fns, found = set(), set(CLOCKS), []

    def uses_clock(node, names: bool = True) -> bool:
        for sub in ast.walk(node):
            if names and isinstance(sub, ast.Name) and sub.id in timed:
                return True
            if isinstance(sub, ast.Call) and _called_name(sub) in clock_fns:
                return True
            if isinstance(sub, ast.Subscript) and isinstance(sub.slice, ast.Constant) \
                    and sub.slice.value == "seconds":
                return True
        return False

    def assign(target, clocked: bool) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                assign(element, clocked)
        elif isinstance(target, ast.Name):
            (timed.add if clocked else timed.discard)(target.id)
        elif clocked and _root_name(target):  # x[k] = ..., x.a = ...: x now holds a time
            timed.add(_root_name(target))

    def visit(statements) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.FunctionDef):  # its names are its own: only its calls count
                if uses_clock(stmt, names=False):
                    clock_fns.add(stmt.name)
                continue
            if isinstance(stmt, ast.Assert):
                if uses_clock(stmt.test):
                    found.append(ast.unparse(stmt.test))
                continue
            for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
                if isinstance(call.func, ast.Attribute) and call.func.attr in MUTATORS \
                        and any(uses_clock(a) for a in call.args) and _root_name(call.func.value):
                    timed.add(_root_name(call.func.value))
            for sub in ast.walk(stmt):  # comprehension variables and := inside the statement
                if isinstance(sub, ast.comprehension) and uses_clock(sub.iter):
                    assign(sub.target, True)
                elif isinstance(sub, ast.NamedExpr):
                    assign(sub.target, uses_clock(sub.value))
            if isinstance(stmt, ast.Assign):
                clocked = uses_clock(stmt.value)
                for target in stmt.targets:
                    assign(target, clocked)
            elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) and stmt.value is not None:
                if uses_clock(stmt.value):
                    assign(stmt.target, True)
            elif isinstance(stmt, (ast.For, ast.While)):
                for _ in range(2):
                    if isinstance(stmt, ast.For):
                        assign(stmt.target, uses_clock(stmt.iter))
                    visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, (ast.With, ast.If, ast.Try)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(stmt, block, []))
                for handler in getattr(stmt, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(source).body)
    return found


MUTATORS = {"append", "extend", "update", "insert", "setdefault"}


def _chapter_source(path) -> str:
    nb = json.loads(path.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    # IPython's magics and shell lines are not Python
    return "\n".join(line for cell in cells for line in cell.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_chapter_asserts_on_a_time(path):
    found = clock_assertions(_chapter_source(path))
    assert not found, (f"{path.name} asserts on a measured time: {found}. Assert the cost claim on "
                       "counts (llmbook.utils.count_flops, count_calls, parameters) and show the time")


def test_the_clock_check_finds_what_it_should():
    # chapter 4 before: a ratio of two interleaved timings, two steps from the clock
    flagged = clock_assertions(
        "turns = time_interleaved({'a': f, 'b': g}, repeat=1)\n"
        "step_ratio = turns['a'] / turns['b']\n"
        "assert 1 / 3 < step_ratio < 3\n")
    assert flagged == ["1 / 3 < step_ratio < 3"]
    # through a list filled in a loop, a table built from it, and a function that times
    assert clock_assertions(
        "times = {'x': []}\n"
        "for n in lengths:\n"
        "    times['x'].append(time_call(lambda: f(n)))\n"
        "timing = pd.DataFrame(times)\n"
        "assert timing.loc[64, 'x'] > 3\n") == ["timing.loc[64, 'x'] > 3"]
    assert clock_assertions(
        "def timed(f):\n    start = time.perf_counter()\n    f()\n    return time.perf_counter() - start\n"
        "t = timed(g)\nassert t < 1\n") == ["t < 1"]
    assert clock_assertions("h = train(m)\nassert sum(h['seconds']) < 5\n") == ["sum(h['seconds']) < 5"]
    # counts, and a table that shows times beside them, are fine
    assert clock_assertions(
        "flops = count_flops(f)\n"
        "t = time_call(f)\n"
        "print(t)\n"
        "assert flops == 2 * n\n") == []


# --- what a reader opening the raw .ipynb sees ------------------------------------------

import re  # noqa: E402

ESCAPE = "\x1b"
WARNING_TEXT = re.compile(r"\b[A-Z]\w*Warning\b|warnings\.warn\(")
# A local absolute path: a home, a temporary folder, an installed package, this checkout.
LOCAL_PATH = re.compile(r"(?<![\w.:/])(/(home|root|Users|tmp|var/folders|opt|usr/lib|work)/|"
                        r"site-packages|dist-packages|[A-Za-z]:\\\\)")
TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")
PROGRESS_MODELS = {"FloatProgressModel", "IntProgressModel", "ProgressStyleModel"}


def reader_visible_problems(nb: dict) -> list[str]:
    """What a committed notebook should not show: stderr, escape codes, warnings, local paths,
    progress widgets (views or saved state). Images are not read (base64 is any letters)."""
    problems = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for index, cell in enumerate(code):
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "stream" and output.get("name") == "stderr":
                problems.append(f"code cell {index}: a standard-error stream")
            texts = ["".join(output.get("text", ""))] + [
                "".join(v) if isinstance(v, list) else str(v)
                for m, v in output.get("data", {}).items() if m in TEXT_MIMES]
            if kind == "error":
                texts += output.get("traceback", [])
            for text in texts:
                if ESCAPE in text:
                    problems.append(f"code cell {index}: a terminal escape code")
                if WARNING_TEXT.search(text):
                    problems.append(f"code cell {index}: warning text: {WARNING_TEXT.search(text)[0]}")
                if LOCAL_PATH.search(text) or str(ROOT) in text:
                    problems.append(f"code cell {index}: a local path")
                if re.search(r"\d+%\|.*\|\s*\d+/\d+\s*\[", text):
                    problems.append(f"code cell {index}: a progress bar")
    state = nb.get("metadata", {}).get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    progress = [m for m, entry in state.items() if entry.get("model_name") in PROGRESS_MODELS]
    if progress:
        problems.append(f"metadata: saved state of {len(progress)} progress widget(s)")
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_committed_outputs_show_a_reader_only_what_they_mean(path):
    problems = reader_visible_problems(json.loads(path.read_text()))
    assert not problems, (f"{path.name}: " + "; ".join(problems[:8]) + " (progress output: run "
                          "scripts/clean_notebooks.py; anything else: fix its cause in the cell)")


def test_the_output_check_finds_what_it_should():
    def nb(outputs, state=None):
        meta = {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": state}}} if state else {}
        return {"cells": [{"cell_type": "code", "outputs": outputs}], "metadata": meta}

    def stream(text, name="stdout"):
        return {"output_type": "stream", "name": name, "text": text}

    assert reader_visible_problems(nb([stream("loss 0.25\n")])) == []
    assert reader_visible_problems(nb([stream("\rtrain:  40%|████   | 2/5 [00:01<00:02]", "stderr")]))
    assert reader_visible_problems(nb([stream("\x1b[A")]))
    assert reader_visible_problems(nb([stream("x.py:3: FutureWarning: old")]))
    assert reader_visible_problems(nb([stream("saved to /home/ann/.cache/x\n")]))
    assert reader_visible_problems(nb([stream(f"read {ROOT}/data/a.jsonl\n")]))
    assert reader_visible_problems(nb([], {"m": {"model_name": "FloatProgressModel"}}))
    assert reader_visible_problems(nb([], {"m": {"model_name": "IntSliderModel"}})) == []
    assert reader_visible_problems(nb([stream("see https://example.org/tmp/x and a/tmp/b\n")])) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_svg_whose_text_a_browser_can_draw_and_the_chinese_edition_translate(path):
    """Every figure is SVG with its words as text (plots.use_style), so that the Chinese edition
    translates them; no glyph is a font's private code point (a formula in a font the browser
    lacks, drawn as boxes); and no figure text mixes words into a formula (untranslatable)."""
    import book_i18n

    nb = json.loads(path.read_text())
    figures = [o["data"] for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]
               if "image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})]
    assert figures and all("image/png" not in d for d in figures), "figures are SVG, not PNG: call plots.use_style()"
    for data in figures:
        svg = "".join(data["image/svg+xml"])
        assert "<text" in svg and "<dc:date>" not in svg, "figure text is text (svg.fonttype none), undated"
        private = [ch for ch in svg if "\ue000" <= ch <= "\uf8ff"]
        assert not private, f"glyphs at private code points: {private[:3]} (write that formula without \\mathcal)"
    messages, mixed = book_i18n.output_messages(path)
    assert not mixed, f"figure texts that mix words into a formula: {mixed}"
    assert any(kind == book_i18n.FIGURE for _, kind, _ in messages)


def _checked_cell_notebook(tmp_path, committed_svg, committed_text):
    """A one-cell notebook whose committed outputs may differ from what the cell prints."""
    source = (
        "# NBVAL_CHECK_OUTPUT\nfrom IPython.display import display\nprint('0.713')\n"
        "display({'image/svg+xml': '<svg><path d=\"M 1.000001\"/></svg>', 'text/plain': 'fig'}, raw=True)"
    )
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=committed_text),
        nbformat.v4.new_output("display_data", data={"image/svg+xml": committed_svg, "text/plain": "fig"}),
    ]
    notebook = nbformat.v4.new_notebook(cells=[cell])
    (tmp_path / "conftest.py").write_text((ROOT / "chapters" / "conftest.py").read_text())
    nbformat.write(notebook, tmp_path / "checked.ipynb")
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p",
                           "no:cacheprovider", "-q", "checked.ipynb"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)


def test_checked_cells_compare_printed_text_but_not_svg_coordinates(tmp_path):
    """Another CPU's kernels move a figure's coordinates in the sixth decimal: that passes;
    a changed printed number fails."""
    moved = _checked_cell_notebook(tmp_path, '<svg><path d="M 1.000002"/></svg>', "0.713\n")
    assert moved.returncode == 0, moved.stdout[-2000:]
    changed = _checked_cell_notebook(tmp_path, '<svg><path d="M 1.000001"/></svg>', "0.705\n")
    assert changed.returncode == 1 and "Cell outputs differ" in changed.stdout, changed.stdout[-2000:]
