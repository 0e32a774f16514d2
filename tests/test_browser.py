"""The built book as a reader meets it: every page opened in headless Chromium, offline.

Runs after the book is built (`make test` and `make test-browser` build it first). The
pages in ``_build/html`` are served on 127.0.0.1 from a thread; Debian's ``chromium``
opens each one with a fresh profile, and the checks read the rendered DOM:

- MathJax typeset every equation (no ``$$``, ``\\[`` or ``\\(`` left as text, no TeX error);
- every image loaded (``naturalWidth > 0``), the folded solutions included;
- no request left for any host but 127.0.0.1 (such requests are blocked and reported);
- nothing went wrong in the console (no JavaScript error, no failed resource);
- every internal link resolves, to a file and, with ``#id``, to an element of that page;
- the navigation works: the sidebar lists every page of ``_toc.yml``, "next" walks them
  in order (one of them by a real click), and the offline search finds a chapter.

All of it holds for both editions: the English at ``_build/html/`` and the Chinese at
``_build/html/zh/`` (its pages are among the built pages; the chapter-structure checks look
for the Chinese titles the catalogues give). Every page links to the same page in the
other language (checked on every page, and followed by real clicks both ways), and a CJK
font is installed for Chromium to draw the Chinese with.

A screenshot of each page goes to ``_build/screenshots/`` (the top, the largest figure and
the first displayed equation, and the whole page). Without Chromium or Playwright the
test is skipped with the command that installs them. Chromium is driven by Playwright for
Python with ``executable_path``: Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import http.server
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import polib
import pytest
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book_i18n  # noqa: E402
from book_toc import toc_files  # noqa: E402
# $LLMBOOK_HTML tests a book built elsewhere (jupyter-book build --path-output DIR: DIR/_build/html).
HTML = Path(os.environ.get("LLMBOOK_HTML", ROOT / "_build" / "html")).resolve()
SHOTS = HTML.parent / "screenshots"
HOST = "127.0.0.1"
# The flags of a reproducible, quiet, offline headless run.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
INSTALL_CHROMIUM = ("Chromium is not installed, so the browser test of the book is skipped. Install it "
                    "(Debian/Ubuntu: `sudo apt-get install chromium`; .ci/run does this in CI) or set "
                    "LLMBOOK_CHROMIUM to the path of a Chromium or Chrome binary.")


def find_chromium() -> str | None:
    """Path of the Chromium binary: $LLMBOOK_CHROMIUM, Debian's /usr/bin/chromium, or one on PATH."""
    candidates = [os.environ.get("LLMBOOK_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def built_pages() -> list[str]:
    """The HTML pages of the built book, relative to _build/html (theme fragments under _static left out)."""
    if not HTML.is_dir():
        return []
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if not any(part.startswith("_") for part in p.relative_to(HTML).parts[:-1]))


PAGES = built_pages()
CHAPTER_PAGES = [f"{f}.html" for f in toc_files() if f.startswith("chapters/")]
# The editions' folders in the site: the English at its root, the Chinese in zh/.
EDITIONS = ["", "zh/"]


def chinese(page: str, english: str) -> str:
    """The Chinese that the catalogue of `page` (e.g. "chapters/03_lora") gives an English message."""
    po = polib.pofile(str(ROOT / "locale" / "zh_CN" / "LC_MESSAGES" / f"{page}.po"))
    found = po.find(english)
    assert found is not None and found.msgstr, f"{page}.po has no Chinese for {english!r}"
    return found.msgstr


def in_edition(edition: str, page: str, english: str) -> str:
    """A title as the page in `edition` shows it."""
    return chinese(page.removesuffix(".html"), english) if edition else english


# ---------------------------------------------------------------------------- serving


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the built book quietly and records the status of every request."""

    statuses: list[tuple[str, int]]  # set per server

    def log_message(self, format, *args):
        pass

    def log_request(self, code="-", size="-"):
        try:
            status = int(getattr(code, "value", code))
        except (TypeError, ValueError):
            status = 0
        self.statuses.append((self.path, status))


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").is_file():
        pytest.skip("the book is not built: run `make book` first (`make test` does)")
    statuses: list[tuple[str, int]] = []
    handler = functools.partial(type("Handler", (_Handler,), {"statuses": statuses}), directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer((HOST, 0), handler)  # port 0: a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{httpd.server_address[1]}", statuses
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser_context(server, tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(INSTALL_CHROMIUM)
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="Playwright for Python is missing: `make setup` installs it (the `test` extra)")
    origin, _ = server
    blocked: list[str] = []

    def only_local(route):
        # Anything not served by our own server is refused and reported.
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data dir
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport=VIEWPORT, device_scale_factor=1, locale="en-US")
        context.set_default_timeout(30_000)
        context.route("**/*", only_local)
        try:
            yield context, blocked
        finally:
            context.close()


# ---------------------------------------------------------------------------- reading a page


@dataclass
class PageReport:
    """What one page did in the browser."""

    page: str
    foreign_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_local: list[str] = field(default_factory=list)
    math: dict = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    folded_open: int = 0
    folded: int = 0
    dropdowns: int = 0
    dropdowns_open: int = 0
    headings: list[str] = field(default_factory=list)
    sidebar: list[str] = field(default_factory=list)
    next_link: str | None = None
    mathjax_version: str | None = None
    goals_first: bool = False
    language_link: str | None = None
    lang: str = ""


# For each dropdown admonition in the page: whether any of its body (all but the title) is visible.
DROPDOWNS_JS = r"""() => [...document.querySelectorAll('main .dropdown.admonition')].map(a =>
    [...a.children].filter(c => !c.classList.contains('admonition-title') && c.tagName !== 'BUTTON')
        .some(c => c.getClientRects().length > 0 && getComputedStyle(c).visibility !== 'hidden'))"""

# MathJax left alone would show its delimiters; code, outputs and MathJax's own output are skipped.
MATH_JS = r"""() => {
  const main = document.querySelector('main') || document.body;
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
  const raw = /\$\$|\\\[|\\\]|\\\(|\\\)|\\begin\{|\$[^$\s](?:[^$]*[\\^_{}][^$]*|[^$\s]?)\$/;
  const leftovers = [];
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (node.parentElement.closest(skip)) continue;
    if (raw.test(node.textContent)) leftovers.push(node.textContent.trim().slice(0, 120));
  }
  const maths = [...main.querySelectorAll('.math')];
  return {
    elements: maths.length,
    typeset: main.querySelectorAll('mjx-container').length,
    untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 120)),
    errors: [...main.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    leftovers,
  };
}"""

IMAGES_JS = """async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done, {once: true});
    img.addEventListener('error', done, {once: true});
    setTimeout(done, 15000);
  })));
  return images.map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0,
                             width: img.naturalWidth}));
}"""

LARGEST_FIGURE_JS = """() => {
  const figures = [...document.querySelectorAll('article img')].filter(img => img.naturalWidth > 0);
  if (!figures.length) return false;
  const area = img => img.clientWidth * img.clientHeight;
  figures.sort((a, b) => area(b) - area(a))[0].scrollIntoView({block: 'center'});
  return true;
}"""

FIRST_DISPLAY_MATH_JS = """() => {
  const math = document.querySelector('article mjx-container[display="true"]');
  if (!math) return false;
  math.scrollIntoView({block: 'center'});
  return true;
}"""

PAGE_JS = """() => ({
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  ids: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name')),
  headings: [...document.querySelectorAll('article h1, article h2')].map(h => h.textContent.replace('#', '').trim()),
  sidebar: [...document.querySelectorAll('nav.bd-docs-nav a[href], .navbar-brand[href]')].map(a => a.href),
  next: (document.querySelector('a.right-next') || {}).href || null,
  mathjax: window.MathJax && window.MathJax.version || null,
  language_link: (document.querySelector('a.llmbook-language-link') || {}).href || null,
  lang: document.documentElement.lang,
  // The learning goals (an admonition, titled in the page's language) come before the first section.
  goals_first: (() => {
    const title = document.documentElement.lang.startsWith('zh') ? GOALS_ZH : 'Learning goals';
    const goals = [...document.querySelectorAll('article .admonition')]
      .find(a => a.querySelector('.admonition-title')?.textContent.includes(title));
    const section = document.querySelector('article h2');
    return !!goals && (!section || !!(goals.compareDocumentPosition(section) & Node.DOCUMENT_POSITION_FOLLOWING));
  })(),
})"""


# The Chinese title of the learning-goals admonition (every chapter gives the same).
GOALS_ZH = chinese("chapters/01_teacher_forcing", "Learning goals")


def slug(page: str) -> str:
    return page.removesuffix(".html").replace("/", "__")


def read_page(context, origin: str, statuses: list, blocked: list, page: str) -> PageReport:
    """Open one page like a reader, wait for MathJax and the images, and record what happened."""
    report = PageReport(page)
    tab = context.new_page()
    requests: list[str] = []
    tab.on("request", lambda r: requests.append(r.url))
    tab.on("console", lambda m: m.type == "error" and report.console_errors.append(f"console: {m.text}"))
    tab.on("pageerror", lambda e: report.console_errors.append(f"uncaught: {e}"))
    first_status, first_blocked = len(statuses), len(blocked)
    try:
        tab.goto(f"{origin}/{page}", wait_until="load")
        tab.wait_for_load_state("networkidle")
        # MathJax typesets after load; its startup promise settles when the page is done.
        report.mathjax_version = tab.evaluate(
            "async () => { if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; "
            "return MathJax.version; } return null; }")
        folded = tab.evaluate("() => [...document.querySelectorAll('main details')].map(d => d.open)")
        report.folded, report.folded_open = len(folded), sum(folded)
        # Dropdown admonitions (a solution's prose): is any of their text shown before a click?
        dropdowns = tab.evaluate(DROPDOWNS_JS)
        report.dropdowns, report.dropdowns_open = len(dropdowns), sum(dropdowns)
        SHOTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=SHOTS / f"{slug(page)}.png")
        # Open what is folded, so that the images and equations inside are checked too.
        tab.evaluate("() => document.querySelectorAll('main details').forEach(d => { d.open = true; })")
        report.images = tab.evaluate(IMAGES_JS)
        if report.mathjax_version:
            tab.evaluate("async () => { await MathJax.startup.promise; }")
        report.math = tab.evaluate(MATH_JS)
        # The largest figure and the first displayed equation, each centred in the window.
        for name, script in (("figure", LARGEST_FIGURE_JS), ("math", FIRST_DISPLAY_MATH_JS)):
            if tab.evaluate(script):
                tab.screenshot(path=SHOTS / f"{slug(page)}-{name}.png")
        tab.evaluate("() => { window.scrollTo(0, 0); document.activeElement && document.activeElement.blur(); }")
        tab.screenshot(path=SHOTS / f"{slug(page)}-full.png", full_page=True)
        tab.wait_for_load_state("networkidle")
        data = tab.evaluate(PAGE_JS.replace("GOALS_ZH", json.dumps(GOALS_ZH)))
    finally:
        tab.close()
    report.links, report.ids = data["links"], set(data["ids"])
    report.headings, report.sidebar = data["headings"], data["sidebar"]
    report.next_link, report.mathjax_version = data["next"], data["mathjax"] or report.mathjax_version
    report.goals_first = data["goals_first"]
    report.language_link, report.lang = data["language_link"], data["lang"]
    report.foreign_requests = [u for u in requests if not u.startswith(origin + "/") and not u.startswith("data:")]
    report.foreign_requests += [u for u in blocked[first_blocked:] if u not in report.foreign_requests]
    report.failed_local = [f"{status} {path}" for path, status in statuses[first_status:] if status >= 400]
    return report


@pytest.fixture(scope="module")
def reader(server, browser_context):
    """``reader(page) -> PageReport``, each page read once per test run."""
    origin, statuses = server
    context, blocked = browser_context
    cache: dict[str, PageReport] = {}

    def read(page: str) -> PageReport:
        if page not in cache:
            cache[page] = read_page(context, origin, statuses, blocked, page)
        return cache[page]

    read.origin = origin
    read.context = context
    return read


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)


@functools.cache
def static_ids(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


def link_problem(link: str, origin: str, reader) -> str | None:
    """Why an internal link does not resolve, or None when it does (or is not internal)."""
    parts = urlsplit(link)
    if f"{parts.scheme}://{parts.netloc}" != origin:
        return None
    path = unquote(parts.path).lstrip("/")
    target = HTML / path
    if path == "" or target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{link}: no such file in _build/html"
    fragment = unquote(parts.fragment)
    if fragment and fragment != "top" and target.suffix == ".html":
        page = target.relative_to(HTML).as_posix()
        ids = set(static_ids(target)) | (reader(page).ids if page in PAGES else set())
        if fragment not in ids:
            return f"{link}: {page} has no element with id {fragment!r}"
    return None


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("edition", EDITIONS)
def test_the_book_is_built_with_every_toc_page(edition):
    if not PAGES:
        pytest.skip("the book is not built: run `make book` first (`make test` does)")
    missing = [f for f in toc_files() if f"{edition}{f}.html" not in PAGES]
    assert not missing, f"listed in _toc.yml but not built in {edition or 'the English edition'}: {missing}"


def counterpart(page: str) -> str:
    """The same page in the other edition."""
    return page.removeprefix("zh/") if page.startswith("zh/") else f"zh/{page}"


@pytest.mark.parametrize("page", [f"{edition}{f}.html" for edition in EDITIONS for f in toc_files()])
def test_every_page_links_to_itself_in_the_other_language(reader, page):
    if page not in PAGES:
        pytest.skip(f"{page} is not built")
    report = reader(page)
    assert report.lang == ("zh-CN" if page.startswith("zh/") else "en"), report.lang
    assert report.language_link, "no link to the other language"
    assert urlsplit(report.language_link).path.lstrip("/") == counterpart(page)
    assert counterpart(page) in PAGES


@contextlib.contextmanager
def after_a_click(reader, page: str, selector: str, lands_on: str):
    """A tab that opened `page`, clicked the link `selector` like a reader, and landed on `lands_on`."""
    tab = reader.context.new_page()
    try:
        tab.goto(f"{reader.origin}/{page}", wait_until="load")
        tab.click(selector)
        tab.wait_for_url(f"{reader.origin}/{lands_on}")
        yield tab
    finally:
        tab.close()


def test_the_language_links_work_by_real_clicks(reader):
    """From an English chapter to its Chinese page and back, by clicking the links a reader sees."""
    page = CHAPTER_PAGES[0]
    if counterpart(page) not in PAGES:
        pytest.skip("no Chinese edition built")
    with after_a_click(reader, page, "a.llmbook-language-link", counterpart(page)) as tab:
        heading = tab.locator("article h1").first.inner_text()
        assert tab.evaluate("document.documentElement.lang") == "zh-CN"
        title = chinese("chapters/01_teacher_forcing",
                        "1. Teacher forcing: what the model sees in training and in inference")
        assert heading.replace("#", "").strip() == title.replace("\\.", "."), heading  # "1\." is Markdown for "1."
        # The sidebar's part captions are Chinese too (the toc's captions, from the root page's catalogue).
        captions = [part["caption"] for part in yaml.safe_load((ROOT / "_toc.yml").read_text())["parts"]]
        shown = tab.locator("nav.bd-docs-nav .caption-text").all_inner_texts()
        assert shown == [chinese("intro", c) for c in captions], shown
        tab.screenshot(path=SHOTS / "language-switch-zh.png")
        tab.click("a.llmbook-language-link")
        tab.wait_for_url(f"{reader.origin}/{page}")
        assert tab.evaluate("document.documentElement.lang") == "en"


def test_a_cjk_font_is_installed_for_the_chinese_edition():
    if find_chromium() is None:
        pytest.skip(INSTALL_CHROMIUM)
    fonts = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    assert fonts.strip(), ("no font with Chinese glyphs: the Chinese pages would show boxes. Install one "
                           "(Debian/Ubuntu: `sudo apt-get install fonts-noto-cjk`; .ci/run does this in CI)")


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline_without_errors(reader, page):
    report = reader(page)
    assert not report.foreign_requests, f"requests that left 127.0.0.1: {report.foreign_requests}"
    assert not report.failed_local, f"local requests that failed: {report.failed_local}"
    assert not report.console_errors, "\n".join(report.console_errors)


@pytest.mark.parametrize("page", PAGES)
def test_every_equation_is_typeset_by_mathjax(reader, page):
    report = reader(page)
    math = report.math
    if math["elements"]:
        assert report.mathjax_version and report.mathjax_version.startswith("3."), "MathJax 3 did not load"
    assert not math["untypeset"], f"equations MathJax did not typeset: {math['untypeset'][:5]}"
    assert not math["errors"], f"TeX errors: {math['errors'][:5]}"
    assert not math["leftovers"], f"raw TeX left in the text: {math['leftovers'][:5]}"
    assert math["typeset"] >= math["elements"]


@pytest.mark.parametrize("page", PAGES)
def test_every_image_loads(reader, page):
    broken = [img["src"] for img in reader(page).images if not img["ok"]]
    assert not broken, f"images that did not load: {broken}"


@pytest.mark.parametrize("page", PAGES)
def test_every_internal_link_resolves(reader, page):
    report = reader(page)
    problems = sorted({p for link in report.links if (p := link_problem(link, reader.origin, reader))})
    assert not problems, "broken internal links:\n" + "\n".join(problems)


@pytest.mark.parametrize("edition", EDITIONS)
def test_navigation_follows_the_toc(reader, edition):
    """The sidebar lists every toc page; "next" from the landing page walks them all in order."""
    pages = [f"{edition}{f}.html" for f in toc_files()]
    if pages[0] not in PAGES:
        pytest.skip(f"{pages[0]} is not built")
    root = reader(pages[0])
    listed = {urlsplit(href).path.lstrip("/") for href in root.sidebar}
    assert set(pages) <= listed, f"missing from the sidebar: {sorted(set(pages) - listed)}"
    walked, page = [pages[0]], pages[0]
    while (nxt := reader(page).next_link) is not None:
        page = urlsplit(nxt).path.lstrip("/")
        assert page not in walked, f"'next' loops back to {page}"
        walked.append(page)
    assert walked == pages, "following 'next' from the first page does not visit the toc in order"


def test_a_real_click_on_next_opens_the_next_page(reader):
    pages = [f"{f}.html" for f in toc_files()]
    if len(pages) < 2:
        pytest.skip("one page only")
    with after_a_click(reader, pages[0], "a.right-next", pages[1]) as tab:
        heading = tab.locator("article h1").first
        heading.wait_for(state="visible")
        assert heading.inner_text().strip(), "the next page shows its title"


@pytest.mark.parametrize("edition, query", [("", "teacher+forcing"), ("zh/", "教师强制")])
def test_the_offline_search_finds_a_chapter(reader, edition, query):
    if f"{edition}search.html" not in PAGES:
        pytest.skip("no search page in this build")
    tab = reader.context.new_page()
    try:
        tab.goto(f"{reader.origin}/{edition}search.html?q={query}", wait_until="load")
        results = tab.locator("#search-results ul.search li")
        results.first.wait_for(timeout=20_000)
        tab.screenshot(path=SHOTS / f"{slug(edition + 'search')}-results.png")
        hrefs = [a.get_attribute("href") for a in tab.locator("#search-results ul.search li a").all()]
        assert any(h and h.startswith("chapters/01_teacher_forcing") for h in hrefs), hrefs
    finally:
        tab.close()


@pytest.mark.parametrize("edition", EDITIONS)
@pytest.mark.parametrize("page", CHAPTER_PAGES)
def test_chapter_reads_like_a_chapter(reader, page, edition):
    """Learning goals at the top, a summary, exercises, and solutions folded away."""
    if edition + page not in PAGES:
        pytest.skip(f"{edition + page} is not built")
    report = reader(edition + page)
    assert report.goals_first, "a 'Learning goals' admonition comes before the first section"
    for section in (in_edition(edition, page, "Summary"), in_edition(edition, page, "Exercises")):
        assert any(h.startswith(section) for h in report.headings), f"no '{section}' section: {report.headings}"
    assert report.folded > 0 and report.folded_open == 0, "solutions are folded until the reader opens them"
    assert report.dropdowns >= 3 and report.dropdowns_open == 0, \
        f"a solution's prose is folded too ({report.dropdowns_open} of {report.dropdowns} dropdowns show their text)"
    assert any(img["ok"] and img["width"] > 100 for img in report.images), "a chapter shows a figure"


@pytest.mark.parametrize("edition", EDITIONS)
@pytest.mark.parametrize("page", ["intro.html", "glossary.html"])
def test_every_chapter_is_linked_from_the_map_and_the_glossary(reader, page, edition):
    page = edition + page
    if page not in PAGES:
        pytest.skip(f"{page} is not in _toc.yml")
    linked = {urlsplit(href).path.lstrip("/") for href in reader(page).links}
    chapters = [edition + p for p in CHAPTER_PAGES if edition + p in PAGES]
    missing = [p for p in chapters if p not in linked]
    assert not missing, (f"{page} links no page of {missing}: check that its {{chapter}} roles name "
                         "these files as _toc.yml does")


# ---------------------------------------------------------------------------- sliders

# The chapters whose figures have sliders (llmbook.widgets.frame_slider); each must work on the built page.
SVG_TEXTS_JS = """async sources => Promise.all(sources.map(src => fetch(src).then(r => r.text())))"""


@pytest.mark.parametrize("page", CHAPTER_PAGES)
def test_the_chinese_figures_and_table_headers_are_chinese(reader, page):
    """The Chinese page's figures, as the browser fetches them, carry the catalogue's Chinese for
    every line of figure text it translates, and none of those English lines; so do its tables'
    column headers. The figure screenshots (``zh__chapters__*-figure.png``) show them drawn."""
    if "zh/" + page not in PAGES:
        pytest.skip(f"zh/{page} is not built")
    entries = [e for e in polib.pofile(str(ROOT / "locale" / "zh_CN" / "LC_MESSAGES" / page.replace(".html", ".po")))
               if e.msgstr != e.msgid]
    figure = {e.msgid: e.msgstr for e in entries if book_i18n.FIGURE in (e.comment or "")}
    table = {e.msgid: e.msgstr for e in entries if book_i18n.TABLE in (e.comment or "")}
    sources = [img["src"] for img in reader("zh/" + page).images if img["src"].endswith(".svg")]
    assert sources, "the figures are SVG"
    tab = reader.context.new_page()
    try:
        tab.goto(f"{reader.origin}/zh/{page}", wait_until="load")
        svgs = tab.evaluate(SVG_TEXTS_JS, sources)
        headers = tab.evaluate("() => [...document.querySelectorAll('article thead th')].map(th => th.textContent.trim())")
    finally:
        tab.close()
    lines = [" ".join(e.text.split()) for svg in svgs for e in book_i18n._svg_lines(svg)[0]]
    assert not [line for line in lines if line in figure], "figure text left in English"
    assert any(line in figure.values() and book_i18n.CJK.search(line) for line in lines), "no Chinese figure text"
    assert not [h for h in headers if h in table], "table headers left in English"


SLIDER_CHAPTERS = ["chapters/03_lora.html", "chapters/06_sampling.html", "chapters/07_dpo.html"]

# The frame shown next to slider k: the image of the panel that holds it (a stack shows one frame at a time).
FRAME_OF_SLIDER = """k => {
  const slider = document.querySelectorAll('.widget-slider')[k];
  const panel = slider.closest('.widget-vbox');
  const shown = [...panel.querySelectorAll('img.widget-image')].filter(img => img.offsetParent !== null);
  return {src: shown.length === 1 ? shown[0].src : null, count: shown.length,
          readout: slider.querySelector('.widget-readout').textContent.trim(),
          label: slider.querySelector('.widget-label').textContent.trim()};
}"""


def test_the_slider_chapters_save_their_sliders():
    if not PAGES:
        pytest.skip("the book is not built: run `make book` first (`make test` does)")
    for page in SLIDER_CHAPTERS:
        html = (HTML / page).read_text()
        assert "SelectionSliderModel" in html and "LinkModel" in html, f"{page} has no linked sliders saved"


@pytest.mark.parametrize("page", [edition + p for edition in EDITIONS for p in SLIDER_CHAPTERS])
def test_moving_a_slider_changes_its_figure_without_a_kernel(reader, page):
    """On the served page (every other host blocked), each slider, moved by the keyboard, shows another frame."""
    if page not in PAGES:
        pytest.skip(f"{page} is not built")
    reader(page)  # the page's own checks (no foreign request, no console error) run on a fresh load
    tab = reader.context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    try:
        tab.goto(f"{reader.origin}/{page}", wait_until="load")
        tab.wait_for_load_state("networkidle")
        handles = tab.locator(".widget-slider .noUi-handle")
        handles.first.wait_for(state="visible")
        n = handles.count()
        assert n >= 1, "no slider on the page"
        for k in range(n):
            before = tab.evaluate(FRAME_OF_SLIDER, k)
            assert before["count"] == 1 and before["src"], f"slider {k}: its panel shows {before['count']} frames"
            panel = tab.locator(".widget-vbox", has=handles.nth(k)).last
            panel.scroll_into_view_if_needed()
            figure = panel.locator("img.widget-image:visible")  # the frame alone, not the slider's readout
            shot_before = figure.screenshot(path=SHOTS / f"{slug(page)}-slider{k}-before.png")
            handles.nth(k).focus()
            tab.keyboard.press("ArrowRight")
            if tab.evaluate(FRAME_OF_SLIDER, k)["readout"] == before["readout"]:  # it was at the end
                tab.keyboard.press("ArrowLeft")
            tab.wait_for_function(f"() => ({FRAME_OF_SLIDER})({k}).src !== {before['src']!r}", timeout=10_000)
            after = tab.evaluate(FRAME_OF_SLIDER, k)
            shot_after = figure.screenshot(path=SHOTS / f"{slug(page)}-slider{k}-after.png")
            assert after["readout"] != before["readout"], f"slider {before['label']!r} did not move"
            assert after["count"] == 1 and shot_after != shot_before, \
                f"slider {before['label']!r}: {before['readout']} -> {after['readout']} left the figure as it was"
    finally:
        tab.close()
    assert not errors, errors
