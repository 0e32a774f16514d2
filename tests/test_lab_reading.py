"""A chapter read and run in JupyterLab as `make lab` serves it, in headless Chromium.

`make lab` is started by its own recipe (``make -o setup lab``) on a free port of 127.0.0.1,
serving a reader's copy in a temporary folder (the recipe makes it with
scripts/reader_copy.py), with Jupyter's configuration, data and runtime folders there too.
Chromium, driven by Playwright, reaches 127.0.0.1 only (any other host is blocked and
reported), opens chapter 6 and checks what a reader meets:

- the chapter's MyST renders: the learning-goals box is an admonition with typeset math
  (no ``$x/T$`` left as text), each solution is a closed dropdown (no ``:class:`` shown);
- the saved sliders are drawn before any cell runs (the copy is trusted), and moving one
  shows another frame, without a kernel's help;
- the notebook runs in the project's kernel, "Python (llmbook)";
- no pop-up asks about Jupyter's news;
- the first code cells run without an error, and the saved notebook stays trusted;
- afterwards, ``git status`` of the checkout is as it was: the reader's runs and saves went
  to the copy, never to ``chapters/``.

Screenshots go to ``_build/screenshots/lab-*.png``. Without Chromium or Playwright the test
is skipped with the command that installs them, as the book's browser test is.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.sign import NotebookNotary

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_browser import CHROMIUM_FLAGS, INSTALL_CHROMIUM, find_chromium  # noqa: E402
from test_lab import running_lab  # noqa: E402

CHAPTER = "06_sampling.ipynb"
RUN_CELLS = 3  # the first code cells: imports and the model, the prompts' logits, temperature
SHOTS = ROOT / "_build" / "screenshots"
PROMPT_IS = """([k, what]) => new RegExp(`\\[${what}\\]`).test(
    document.querySelectorAll('.jp-Notebook .jp-CodeCell')[k].querySelector('.jp-InputPrompt').textContent)"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if find_chromium() is None:
        pytest.skip(INSTALL_CHROMIUM)
    pytest.importorskip("playwright.sync_api",
                        reason="Playwright for Python is missing: `make setup` installs it (the `test` extra)")
    if shutil.which("git") is None:
        pytest.skip("`git` is needed")
    tmp = tmp_path_factory.mktemp("lab")
    git_before = _git_status()
    with running_lab(tmp, tmp / "reader") as (port, token, _, output):
        yield {"origin": f"http://127.0.0.1:{port}", "token": token, "reader": tmp / "reader",
               "data": tmp / "data", "output": output, "git_before": git_before}


@pytest.fixture(scope="module")
def tab(lab):
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []

    def only_local(route):
        if route.request.url.startswith(lab["origin"] + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, locale="en-US")
        page.set_default_timeout(60_000)
        page.route("**/*", only_local)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{lab['origin']}/lab/tree/{CHAPTER}?token={lab['token']}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.locator(".jp-Notebook .widget-slider").first.wait_for()  # saved widgets drawn
        page.wait_for_timeout(3000)  # let any pop-up that would come, come
        page.screenshot(path=SHOTS / "lab-opened.png")
        yield page, blocked, errors
        browser.close()


def test_make_lab_opens_a_readers_copy(lab):
    copy = lab["reader"] / CHAPTER
    assert "holds your copy of the" in lab["output"] and copy.is_file()
    assert _sha(copy) == _sha(ROOT / "chapters" / CHAPTER)


def test_the_myst_renders_as_in_the_book(tab):
    page, _, _ = tab
    goals = page.locator(".myst-admonition", has_text="Learning goals").first
    goals.scroll_into_view_if_needed()
    goals.screenshot(path=SHOTS / "lab-learning-goals.png")
    assert goals.locator(".katex").count() >= 1, "the learning goals' math is not typeset"
    assert "$" not in goals.inner_text()
    solutions = page.locator("details", has_text="Solution")
    assert solutions.count() >= 3
    assert not any(solutions.nth(k).evaluate("d => d.open") for k in range(solutions.count()))
    first = solutions.first
    first.scroll_into_view_if_needed()
    first.locator("summary").click()
    assert first.evaluate("d => d.open")
    first.screenshot(path=SHOTS / "lab-solution-opened.png")
    for raw in (":class:", "```{admonition}", "{admonition}"):
        assert page.get_by_text(raw).filter(visible=True).count() == 0, f"{raw!r} is shown as text"


def test_the_saved_sliders_show_and_move_before_any_cell_runs(tab):
    page, _, _ = tab
    assert page.get_by_text("VBox(children").filter(visible=True).count() == 0
    slider = page.locator(".widget-slider").first
    panel = page.locator(".widget-vbox", has=slider).last
    panel.scroll_into_view_if_needed()
    frame = panel.locator("img.widget-image:visible")
    before = frame.get_attribute("src")
    panel.screenshot(path=SHOTS / "lab-slider-before.png")
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("src => [...document.querySelectorAll('img.widget-image')]"
                           ".some(i => i.checkVisibility() && i.src !== src)", arg=before, timeout=10_000)
    assert frame.get_attribute("src") != before
    panel.screenshot(path=SHOTS / "lab-slider-after.png")


def test_the_chapter_runs_in_the_projects_kernel_without_a_news_popup(tab):
    page, _, _ = tab
    kernel = page.locator(".jp-NotebookPanel-toolbar .jp-KernelName, .jp-NotebookPanel-toolbar "
                          "[data-jp-item-name='kernelName']").first
    assert kernel.inner_text().strip() == "Python (llmbook)"
    assert page.get_by_text("official Jupyter news").count() == 0


def test_the_first_cells_run_and_the_checkout_stays_as_it_was(lab, tab):
    page, blocked, errors = tab
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    for k in range(RUN_CELLS):
        cell = cells.nth(k)
        cell.scroll_into_view_if_needed()
        cell.locator(".jp-InputPrompt").click()  # selects the cell (command mode)
        page.keyboard.press("Control+Enter")
        prompt = cell.locator(".jp-InputPrompt")
        # "[*]" while it is queued or runs, then its execution count
        page.wait_for_function(PROMPT_IS, arg=[k, "\\*"], polling=100, timeout=30_000)
        page.wait_for_function(PROMPT_IS, arg=[k, "\\d+"], polling=250, timeout=180_000)
        assert prompt.inner_text().strip() == f"[{k + 1}]:", f"code cell {k} ran out of order"
        shown = cell.locator(".jp-OutputArea").inner_text()
        assert "Error" not in shown and "Traceback" not in shown, f"code cell {k}: {shown[:500]}"
        if k == 0:
            assert "vocabulary of 49152 tokens" in shown
    page.screenshot(path=SHOTS / "lab-after-running.png")
    page.locator(".jp-NotebookPanel-toolbar [data-command='docmanager:save']").click()
    page.locator(".lm-TabBar-tab.jp-mod-dirty").wait_for(state="detached")  # saved
    copy = lab["reader"] / CHAPTER
    assert _sha(copy) != _sha(ROOT / "chapters" / CHAPTER), "the runs were not saved to the reader's copy"
    notary = NotebookNotary(data_dir=str(lab["data"]))
    assert notary.check_signature(nbformat.read(copy, as_version=4)), "the saved copy is no longer trusted"
    assert _git_status() == lab["git_before"], "a reader's runs changed the checkout"
    assert not blocked, f"requests to other hosts: {blocked}"
    assert not errors, errors
