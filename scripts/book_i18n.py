"""The Chinese edition: one source (the English pages and notebooks), Chinese in gettext catalogues.

Sphinx's gettext builder cuts every page into messages (a paragraph, a heading, a table
cell, a list item), keyed by their English Markdown. The Chinese of each lives in
``locale/zh_CN/LC_MESSAGES/<page>.po``; the Chinese build replaces every message by its
translation and keeps code and outputs of the same executed notebooks; the text of their
figures (SVG) and the column headers of their tables are messages too, replaced in the
Chinese build's own copy of the figures and pages.

    python scripts/book_i18n.py update   # English changed: refresh the catalogues
    python scripts/book_i18n.py check    # every message translated, nothing fuzzy, spans kept
    python scripts/book_i18n.py build    # check, then build _build/html/zh/

``update`` keeps every translation whose English is unchanged; an edited paragraph keeps
its old Chinese marked *fuzzy*, a new one gets none. ``check`` (and so ``build``, and so
``make book``) fails on both, naming the page, the line and the English, so that an edit
of the English cannot land without its Chinese. It also fails when a translation loses or
changes a math span, a code span, a number, a link or a role's target, when its bold and
italics differ from the English's (a ``**`` beside Chinese punctuation may not close), when it leaves a
glossary term out of its glossary Chinese, when it writes a word the glossary's table of
Chinese words replaces, and when it has no Chinese at all without the
translator comment ``same in Chinese`` (a name, an English term in the glossary's own
column). Messages with nothing to translate (numbers, code, math, text already Chinese)
are filled in by ``update`` itself.
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import polib

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE = "zh_CN"
# The Chinese edition is served from this folder of the English site.
SUBDIR = "zh"
LOCALE = "locale"
SAME = "same in Chinese"
TITLE_ZH = "大模型微调与对齐：可运行的教程"
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")

# Spans a translation must keep as they are. Order matters: code before math (a `$` in
# code is code), roles and links before bare numbers.
CODE = re.compile(r"(`+)(.+?)\1", re.S)
MATH = re.compile(r"\$\$.+?\$\$|\$[^$\n]+?\$", re.S)
ROLE = re.compile(r"\{([\w:-]+)\}`([^`]*)`")
LINK = re.compile(r"\]\(([^)\s]+)\)|<(https?://[^>\s]+)>")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:[.,]\d+)*")
# Words that a message of figures only may still contain (units, the "x" of "3 x 4").
UNITS = {"s", "ms", "min", "h", "x", "k", "m", "b", "kib", "mib", "gib", "mb", "gb", "kb", "it"}


def strip_spans(text: str) -> tuple[str, dict[str, list[str]]]:
    """The text without its code, math, role and link spans, and those spans by kind."""
    spans: dict[str, list[str]] = {"code": [], "math": [], "role target": [], "link": []}

    def role(m: re.Match) -> str:
        target = re.search(r"<([^<>]+)>\s*$", m.group(2))
        spans["role target"].append(f"{{{m.group(1)}}}" + (target.group(1) if target else m.group(2)))
        # The role's visible title is text: it is translated and its numbers are kept.
        return " " + (m.group(2)[: target.start()] if target else "") + " "

    text = ROLE.sub(role, text)
    text = CODE.sub(lambda m: spans["code"].append(m.group(2).strip()) or " ", text)
    text = MATH.sub(lambda m: spans["math"].append(re.sub(r"\s+", "", m.group(0))) or " ", text)
    text = LINK.sub(lambda m: spans["link"].append(m.group(1) or m.group(2)) or "] ", text)
    return text, spans


def kept_spans(text: str) -> dict[str, list[str]]:
    """What a translation must keep: code, math, role targets, links and numbers, sorted."""
    rest, spans = strip_spans(text)
    spans["number"] = [n.replace("−", "-") for n in NUMBER.findall(rest)]
    return {kind: sorted(values) for kind, values in spans.items()}


def emphasis(text: str) -> dict[str, int]:
    """How many bold and italic spans Markdown (markdown-it, MyST's parser) reads in `text`."""
    from markdown_it import MarkdownIt

    counts = {"bold": 0, "italic": 0}
    for token in MarkdownIt("commonmark").parseInline(text)[0].children or []:
        if token.type in ("strong_open", "em_open"):
            counts["bold" if token.type == "strong_open" else "italic"] += 1
    return counts


def nothing_to_translate(msgid: str) -> bool:
    """True for figures, code, math and text that is Chinese already: copied as they are."""
    rest, _ = strip_spans(msgid)
    rest = NUMBER.sub(" ", rest)
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", rest)
    return all(w.lower() in UNITS for w in words)


# --- the glossary: its English terms and their Chinese -------------------------------------

# English spellings that name a glossary term without its exact words.
TERM_VARIANTS = {
    "logprobs": ["log-probs", "log-prob", "log-probabilities", "log-probability", "logprob"],
    "prefix-tuning": ["prefix tuning"],
    "KL divergence": ["KL-divergence"],
    "hallucination": ["hallucinate", "hallucinates", "hallucinated", "hallucinating"],
}


def _plain(cell: str) -> str:
    """A glossary cell without its parenthesis: the term itself."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", cell).strip()


def glossary_terms(path: Path = ROOT / "glossary.md") -> dict[str, str]:
    """English term -> the Chinese the glossary gives it, from the glossary's table.

    The term is the cell without its parenthesis ("teacher forcing" from "teacher forcing";
    "prefix-tuning"; "LoRA" from "LoRA (low-rank adaptation)"); cells with "a / b" give two
    terms. Terms that are math only ($\\beta$) are left out: math is kept as it is anyway.
    """
    terms: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not CJK.search(cells[1]) or cells[0] in ("English", "---"):
            continue
        english, chinese = _plain(cells[0]), _plain(cells[1])
        pairs = (zip(english.split(" / "), chinese.split(" / "))
                 if english.count(" / ") == chinese.count(" / ") else [(english, chinese)])
        for en, zh in pairs:
            if en.strip() and not MATH.fullmatch(en.strip()):
                terms[en.strip()] = zh.strip()
    return terms


def term_pattern(term: str) -> re.Pattern:
    """The term and its variants as whole words (a plural -s or -es allowed), any case."""
    spellings = [term, *TERM_VARIANTS.get(term, [])]
    # British and American spellings alike: "optimisation" and "optimization".
    alternatives = "|".join(re.escape(s).replace("isation", "i[sz]ation").replace("ization", "i[sz]ation")
                            + r"(?:e?s)?" for s in sorted(spellings, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.I)


WORD_TABLE = "| English | 中文 | not |"


@dataclass(frozen=True)
class Word:
    """One row of the glossary's table of Chinese words: the word, and the ones it replaces."""
    english: str
    chinese: str
    chosen: re.Pattern
    avoided: tuple[tuple[str, re.Pattern], ...]


def _word_pattern(word: str, *, spaced: bool = False) -> re.Pattern:
    """`word` in a translation: a run of digits stands for any number, a space for any (or,
    with `spaced`, at least one) white space; Latin letters match in any case."""
    parts = []
    for piece in re.split(r"(\d+|\s+)", word):
        if piece.isdigit():
            parts.append(r"\d+(?:[.,]\d+)*")
        elif piece.isspace():
            parts.append(r"\s+" if spaced else r"\s*")
        elif piece:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.I)


def word_table(path: Path = ROOT / "glossary.md") -> list[Word]:
    """The glossary's table of Chinese words (its section "One Chinese word per concept")."""
    rows, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == WORD_TABLE:
            inside = True
            continue
        if not inside or line.startswith("|---"):
            continue
        if not line.startswith("|"):
            break
        english, chinese, avoided = (c.strip() for c in line.strip().strip("|").split("|"))
        words = [] if avoided in ("—", "-", "") else [w.strip() for w in avoided.split(" / ")]
        # "50 %" against "50%": the same word but for a space, which is then what is avoided.
        rows.append(Word(english, chinese, _word_pattern(chinese), tuple(
            (w, _word_pattern(w, spaced=_squash(w) == _squash(chinese))) for w in words)))
    return rows


def avoided_words(text: str, words: list[Word]) -> list[str]:
    """What `text` (a translation) writes that the word table says to write otherwise."""
    rest, _ = strip_spans(text)
    problems = []
    for word in words:
        # An avoided word inside the chosen one is the chosen one ("种子" in "随机种子").
        chosen = [m.span() for m in word.chosen.finditer(rest)]
        for avoided, pattern in word.avoided:
            found = [m.group(0) for m in pattern.finditer(rest)
                     if not any(a <= m.start() and m.end() <= b for a, b in chosen)]
            if found:
                problems.append(f"writes {found[0]!r} ({avoided!r}): the glossary's Chinese for "
                                f"{word.english!r} is {word.chinese!r}")
    return problems


# --- catalogues ------------------------------------------------------------------------------

@dataclass
class Problem:
    page: str
    line: str
    what: str
    msgid: str

    def __str__(self) -> str:
        english = self.msgid if len(self.msgid) <= 160 else self.msgid[:157] + "..."
        return f"{self.page} ({self.line}): {self.what}\n    English: {english!r}"


# --- the text of figures and table headers in the executed notebooks ------------------------
#
# Figures are SVG with their text as text (llmbook.plots.use_style). Every line of a figure's
# text (title, axis label, legend entry, annotation) and every column header of a displayed
# table is a message of its page's catalogue, beside the prose; the Chinese build translates
# the figures and tables of its own copy of the pages, from the same executed notebooks.

SVG = "{http://www.w3.org/2000/svg}"
FIGURE, TABLE = "figure text", "table header"
# Words a formula may spell in upright type ($\log$, $\mathrm{KL}$): not words to translate.
MATH_WORDS = {"log", "exp", "min", "max", "clip", "kl", "bon", "ref", "old", "softmax", "nats", "bits"}
TH = re.compile(r"(<th\b[^>]*>)(.*?)(</th>)", re.S)
THEAD = re.compile(r"<thead\b.*?</thead>", re.S)
# Chinese fonts a reader's system may have, tried before the figure's generic sans-serif.
CJK_FONTS = "'Noto Sans CJK SC', 'Source Han Sans SC', 'PingFang SC', 'Microsoft YaHei', "


def _svg_lines(svg: str) -> tuple[list[ElementTree.Element], list[str]]:
    """The <text> elements of a figure that hold a line of text, and the formulas among the
    others that also spell words (their words cannot be translated: one glyph per <tspan>)."""
    lines, mixed = [], []
    for element in ElementTree.fromstring(svg).iter(f"{SVG}text"):
        spans = list(element)
        if not spans:
            if (element.text or "").strip():
                lines.append(element)
            continue
        # A formula, one glyph per <tspan>, grouped by font: upright glyphs that spell a word
        # (other than a function name such as log) are prose inside it.
        runs, run = [], ""
        for span in spans:
            style = span.get("style") or ""
            if "oblique" in style or "italic" in style or "DejaVu Sans" not in style:
                runs.append(run)
                run = ""
            else:
                run += span.text or ""
        runs.append(run)
        words = [w for r in runs for w in re.findall(r"[A-Za-z]{3,}", r) if w.lower() not in MATH_WORDS]
        if words:
            mixed.append("".join(s.text or "" for s in spans))
    return lines, mixed


def _cell_text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def output_messages(notebook: Path) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(code cell, kind, text) of every figure line and table column header worth translating,
    and (code cell, formula) of the figure texts that mix words into a formula."""
    cells = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    found, mixed = [], []
    for index, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/svg+xml" in data:
                lines, formulas = _svg_lines("".join(data["image/svg+xml"]))
                found += [(index, FIGURE, " ".join(e.text.split())) for e in lines]
                mixed += [(index, f) for f in formulas]
            for head in THEAD.findall("".join(data.get("text/html", ""))):
                found += [(index, TABLE, _cell_text(m.group(2))) for m in TH.finditer(head)]
    return [(i, k, s) for i, k, s in found if s and not nothing_to_translate(s)], mixed


def add_output_messages(pot_dir: Path) -> None:
    """Append each chapter's figure and table-header messages to its .pot."""
    for pot_file in sorted(pot_dir.rglob("*.pot")):
        notebook = ROOT / pot_file.relative_to(pot_dir).with_suffix(".ipynb")
        if not notebook.exists():
            continue
        pot = polib.pofile(str(pot_file), wrapwidth=0)
        known = {e.msgid: e for e in pot}
        for index, kind, text in output_messages(notebook)[0]:
            where = (notebook.name, str(index))
            if text in known:
                if where not in known[text].occurrences:
                    known[text].occurrences.append(where)
                if kind not in (known[text].comment or ""):
                    known[text].comment = "; ".join(filter(None, [known[text].comment, kind]))
                continue
            known[text] = polib.POEntry(msgid=text, msgstr="", comment=kind, occurrences=[where])
            pot.append(known[text])
        pot.save(str(pot_file))


# A line of a multi-line figure text: matplotlib places it by its left end, with no anchor.
UNANCHORED = re.compile(r'(<text style=")([^"]*)(" transform="translate\()([-\d.e]+) ([-\d.e]+)(\)">)([^<]+)(</text>)')


def _width(text: str, style: str) -> float:
    """The width of `text` as matplotlib laid it out (DejaVu Sans at the style's size)."""
    from matplotlib.font_manager import FontProperties

    size = float(re.search(r"font-size: ([\d.]+)px", style).group(1))
    return _text_to_path().get_text_width_height_descent(text, FontProperties(family="DejaVu Sans", size=size),
                                                         ismath=False)[0]


@functools.cache
def _text_to_path():
    """One matplotlib text layout engine for the whole build (it caches the fonts it loads)."""
    from matplotlib.textpath import TextToPath

    return TextToPath()


def _anchor_lines(group: str, catalogue: dict[str, str]) -> str:
    """Give the lines of one multi-line figure text the anchor of their alignment (found from
    where their English lines start and end), so that a translation of another width stays
    centred or right-aligned as the English was."""
    lines = [m for m in UNANCHORED.finditer(group) if "text-anchor" not in m.group(2)]
    if len(lines) < 2 or not any(" ".join(html.unescape(m.group(7)).split()) in catalogue for m in lines):
        return group
    ends = [(float(m.group(4)), _width(html.unescape(m.group(7)), m.group(2))) for m in lines]
    spread = {share: max(x + share * w for x, w in ends) - min(x + share * w for x, w in ends)
              for share in (0.0, 0.5, 1.0)}
    share = min(spread, key=spread.get)
    if share == 0.0:
        return group
    anchor = "middle" if share == 0.5 else "end"

    def anchored(m: re.Match) -> str:
        if "text-anchor" in m.group(2):
            return m.group(0)
        x = float(m.group(4)) + share * _width(html.unescape(m.group(7)), m.group(2))
        return (m.group(1) + m.group(2).rstrip("; ") + f"; text-anchor: {anchor}" + m.group(3)
                + f"{x:.6f} {m.group(5)}" + "".join(m.group(i) for i in (6, 7, 8)))

    return UNANCHORED.sub(anchored, group)


def _translate_svg(svg: str, catalogue: dict[str, str]) -> tuple[str, int]:
    """`svg` with each line of text that `catalogue` translates replaced; how many were."""
    svg = "".join(_anchor_lines(group, catalogue) for group in re.split(r'(?=<g id="text_)', svg))
    done = 0

    def line(m: re.Match) -> str:
        nonlocal done
        english = " ".join(html.unescape(m.group(2)).split())
        if english not in catalogue:
            return m.group(0)
        done += 1
        start = m.group(1).replace("sans-serif", CJK_FONTS + "sans-serif", 1)
        return start + html.escape(catalogue[english], quote=False) + m.group(3)

    return re.sub(r"(<text\b[^>]*>)([^<]+)(</text>)", line, svg), done


def translate_outputs(out: Path, locale: Path, pages: list[str]) -> int:
    """Translate, in the built Chinese pages under `out`, the figures (their SVG files) and the
    table headers of the notebooks' outputs; returns how many texts were replaced."""
    replaced = 0
    for page in pages:
        page_html, po_file = out / f"{page}.html", po_path(page, locale)
        if not page_html.exists() or not po_file.exists():
            continue
        # Messages kept as they are (a name, a token) leave their text as it is.
        entries = [e for e in polib.pofile(str(po_file))
                   if e.msgstr and e.msgstr != e.msgid and "fuzzy" not in e.flags]
        figures = {e.msgid: e.msgstr for e in entries if FIGURE in (e.comment or "")}
        tables = {e.msgid: e.msgstr for e in entries if TABLE in (e.comment or "")}
        text = page_html.read_text(encoding="utf-8")
        for src in sorted(set(re.findall(r'<img\b[^>]*\bsrc="([^"]+\.svg)"', text))):
            image = (page_html.parent / src).resolve()
            if out.resolve() in image.parents and image.exists():
                svg, done = _translate_svg(image.read_text(encoding="utf-8"), figures)
                image.write_text(svg, encoding="utf-8")
                replaced += done
        text, done = _translate_headers(text, tables)
        page_html.write_text(text, encoding="utf-8")
        replaced += done
    return replaced


def _translate_headers(page: str, catalogue: dict[str, str]) -> tuple[str, int]:
    """`page` with the column headers of its tables that `catalogue` translates replaced."""
    done = 0

    def header(m: re.Match) -> str:
        nonlocal done
        english = _cell_text(m.group(2))
        if english not in catalogue:
            return m.group(0)
        done += 1
        return m.group(1) + html.escape(catalogue[english], quote=False) + m.group(3)

    return THEAD.sub(lambda head: TH.sub(header, head.group(0)), page), done


def po_path(page: str, locale: Path) -> Path:
    return locale / LANGUAGE / "LC_MESSAGES" / f"{page}.po"


def build_sphinx_here(out: Path, builder: str, doctrees: Path, overrides: dict, *, strict: bool) -> int:
    """Jupyter Book's Sphinx build of this book, with `overrides` on top of _config.yml."""
    from jupyter_book.sphinx import build_sphinx

    overrides = {"latex_individualpages": False, **overrides}
    return build_sphinx(str(ROOT), str(out), noconfig=True, path_config=str(ROOT / "_config.yml"),
                        confoverrides=overrides, builder=builder, doctreedir=str(doctrees),
                        warningiserror=strict, keep_going=strict, quiet=True)


def extract(pot_dir: Path) -> list[str]:
    """Write one .pot per page into `pot_dir` (Sphinx's gettext builder); the pages' names."""
    if pot_dir.exists():
        shutil.rmtree(pot_dir)
    # A fixed creation date in the .pot headers, so that `update` rewrites no catalogue
    # whose messages did not change.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    try:
        code = build_sphinx_here(pot_dir, "gettext", pot_dir.parent / ".doctrees-gettext",
                                 {"gettext_compact": False, "gettext_uuid": False,
                                  "gettext_location": True, "gettext_last_translator": "",
                                  "version": "", "release": ""}, strict=False)
    finally:
        if epoch is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = epoch
    if code:
        raise SystemExit(f"the gettext build failed (exit {code})")
    add_output_messages(pot_dir)
    return sorted(str(p.relative_to(pot_dir).with_suffix("")) for p in pot_dir.rglob("*.pot"))


def fill_neutral(po: polib.POFile) -> int:
    """Copy messages with nothing to translate; returns how many were filled."""
    filled = 0
    for entry in po:
        if not entry.obsolete and not entry.msgstr and nothing_to_translate(entry.msgid):
            entry.msgstr = entry.msgid
            entry.tcomment = SAME
            filled += 1
    return filled


def update(pot_dir: Path, locale: Path) -> None:
    """Merge the fresh .pot files into the catalogues (sphinx-intl, which marks edits fuzzy)."""
    from sphinx_intl.basic import update as intl_update

    intl_update(str(locale), str(pot_dir), (LANGUAGE,), line_width=-1, jobs=1)
    for po_file in sorted((locale / LANGUAGE / "LC_MESSAGES").rglob("*.po")):
        page = str(po_file.relative_to(locale / LANGUAGE / "LC_MESSAGES").with_suffix(""))
        if not (pot_dir / f"{page}.pot").exists():
            print(f"{po_file}: no such page any more; delete it")
            continue
        po = polib.pofile(str(po_file), wrapwidth=0)
        obsolete = [e for e in po if e.obsolete]
        for entry in obsolete:
            po.remove(entry)
        filled = fill_neutral(po)
        po.save(str(po_file))
        todo = sum(1 for e in po if not e.msgstr or "fuzzy" in e.flags)
        print(f"{po_file}: {filled} copied as they are, {len(obsolete)} obsolete removed, {todo} to translate")


def check_entry(entry: polib.POEntry, terms: dict[str, tuple[str, re.Pattern]],
                words: list[Word] = ()) -> list[str]:
    """What is wrong with one translated message (an empty list when nothing is).

    `terms` are the glossary's terms (:func:`term_patterns`), `words` its table of Chinese
    words (:func:`word_table`)."""
    if not entry.msgstr:
        return ["no translation"]
    if "fuzzy" in entry.flags:
        return ["fuzzy: the English changed since it was translated"]
    problems = []
    if not CJK.search(entry.msgstr) and SAME not in (entry.tcomment or ""):
        problems.append(f"no Chinese in the translation (a name or term kept as it is needs the "
                        f"translator comment '# {SAME}')")
    if emphasis(entry.msgid) != emphasis(entry.msgstr):
        problems.append(f"bold/italic differ (English {emphasis(entry.msgid)}, Chinese {emphasis(entry.msgstr)}): "
                        "a ** or * next to Chinese punctuation may not open or close")
    want, got = kept_spans(entry.msgid), kept_spans(entry.msgstr)
    for kind in want:
        if want[kind] != got[kind]:
            lost = sorted(set(want[kind]) - set(got[kind]))
            added = sorted(set(got[kind]) - set(want[kind]))
            problems.append(f"{kind} spans differ (English {want[kind]}, Chinese {got[kind]}"
                            + (f"; lost {lost}" if lost else "") + (f"; added {added}" if added else "") + ")")
    # A message kept in English on purpose (the glossary's English column) keeps its terms too.
    if SAME not in (entry.tcomment or ""):
        rest_en, _ = strip_spans(entry.msgid)
        rest_zh, _ = strip_spans(entry.msgstr)
        for chinese, (english, pattern) in terms.items():
            if pattern.search(rest_en) and _squash(chinese) not in _squash(rest_zh):
                problems.append(f"the glossary's Chinese for {english} is {chinese!r}, missing here")
        problems += avoided_words(entry.msgstr, list(words))
    return problems


def _squash(text: str) -> str:
    """Lower case without spaces: "KV 缓存" and "KV缓存" are the same term."""
    return re.sub(r"\s+", "", text).lower()


def term_patterns() -> dict[str, tuple[str, re.Pattern]]:
    """Chinese term -> its English term(s) (for messages) and the pattern that finds them."""
    english: dict[str, list[str]] = {}
    for en, zh in glossary_terms().items():
        english.setdefault(zh, []).append(en)
    return {zh: (" / ".join(repr(e) for e in ens),
                 re.compile("|".join(term_pattern(e).pattern for e in ens), re.I))
            for zh, ens in english.items()}


def check(pot_dir: Path, locale: Path, pages: list[str] | None = None) -> list[Problem]:
    """Every message of every page translated, not fuzzy, spans kept, glossary terms used."""
    known = sorted(str(p.relative_to(pot_dir).with_suffix("")) for p in pot_dir.rglob("*.pot"))
    unknown = sorted(set(pages or []) - set(known))
    if unknown:
        raise ValueError(f"--page {unknown[0]!r} is not a page of the book; the pages are: {', '.join(known)}")
    terms, words = term_patterns(), word_table()
    problems = []
    for pot_file in sorted(pot_dir.rglob("*.pot")):
        page = str(pot_file.relative_to(pot_dir).with_suffix(""))
        if pages and page not in pages:
            continue
        po_file = po_path(page, locale)
        if not po_file.exists():
            problems.append(Problem(page, str(po_file), "no catalogue for this page "
                                    "(run: python scripts/book_i18n.py update)", ""))
            continue
        notebook = ROOT / f"{page}.ipynb"
        for index, formula in (output_messages(notebook)[1] if notebook.exists() else []):
            problems.append(Problem(page, f"{notebook.name}, code cell {index}", "a figure text mixes words "
                                    "into a formula, which cannot be translated: give the words a text of "
                                    "their own (a label, a title) and keep the formula all math", formula))
        translated = {e.msgid: e for e in polib.pofile(str(po_file)) if not e.obsolete}
        for entry in polib.pofile(str(pot_file)):
            line = ", ".join(f"{Path(f).name}:{n}" for f, n in entry.occurrences[:2])
            found = translated.get(entry.msgid)
            if found is None:
                problems.append(Problem(page, line, "not in the catalogue (run: python "
                                        "scripts/book_i18n.py update, then translate it)", entry.msgid))
                continue
            problems += [Problem(page, line, what, entry.msgid) for what in check_entry(found, terms, words)]
    return problems


def build(out: Path, locale: Path, pot_dir: Path) -> int:
    """The Chinese edition into `out`, after `check` passed."""
    problems = check(pot_dir, locale)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"\nThe Chinese edition is not built: {len(problems)} message(s) above need their "
              f"Chinese (in {locale}/{LANGUAGE}/LC_MESSAGES/<page>.po). After an edit of the English, "
              "run `python scripts/book_i18n.py update` and translate what it lists.", file=sys.stderr)
        return 1
    # The search index cuts Chinese into words with jieba; the glossary's terms are words of
    # its dictionary, so that 教师强制 is found as one word.
    words = ROOT / "_build" / "zh-search-words.txt"
    words.parent.mkdir(parents=True, exist_ok=True)
    words.write_text("".join(f"{zh} 1000\n" for zh in sorted(set(glossary_terms().values()))
                             if CJK.search(zh) and not re.search(r"\s", zh)), encoding="utf-8")
    code = build_sphinx_here(out, "html", ROOT / "_build" / ".doctrees-zh",
                             {"language": LANGUAGE, "locale_dirs": [str(locale.resolve())],
                              "gettext_compact": False, "html_title": TITLE_ZH,
                              "html_search_language": "zh", "html_search_options": {"dict": str(words)}},
                             strict=True)
    if code == 0:
        pages = [str(p.relative_to(pot_dir).with_suffix("")) for p in pot_dir.rglob("*.pot")]
        print(f"{translate_outputs(out, locale, pages)} figure texts and table headers translated")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["update", "check", "build", "terms"])
    parser.add_argument("--page", action="append", help="check only this page (e.g. chapters/03_lora)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "html" / SUBDIR,
                        help="where `build` writes the Chinese edition (default: _build/html/zh)")
    parser.add_argument("--locale", type=Path, default=ROOT / LOCALE)
    parser.add_argument("--pots", type=Path, help="check against these .pot files instead of "
                        "extracting them afresh (they are written to _build/gettext)")
    args = parser.parse_args(argv)
    if args.command == "terms":
        for english, chinese in glossary_terms().items():
            print(f"{english:36} {chinese}")
        return 0
    pot_dir = args.pots or ROOT / "_build" / "gettext"
    if not args.pots:
        extract(pot_dir)
    if args.command == "update":
        update(pot_dir, args.locale)
        return 0
    if args.command == "check":
        try:
            problems = check(pot_dir, args.locale, args.page)
        except ValueError as error:
            parser.error(str(error))
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return build(args.out, args.locale, pot_dir)


if __name__ == "__main__":
    sys.exit(main())
