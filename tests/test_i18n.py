"""The Chinese edition: complete, faithful to the English's math, code and numbers, and unable to drift.

The catalogues in locale/ are checked against messages extracted afresh from the English
pages (Sphinx's gettext builder, as `make book` does); a copy of the book with one English
paragraph added and one edited must refuse to build its Chinese edition, naming both.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polib
import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book_i18n  # noqa: E402
from book_toc import toc_files  # noqa: E402

NOTES = ROOT.parent / "shared" / "seeds" / "000_f209f6c29d1ac4ab.txt"


@pytest.fixture(scope="module")
def pots(tmp_path_factory) -> Path:
    """The English pages' messages, extracted afresh."""
    pot_dir = tmp_path_factory.mktemp("gettext") / "gettext"
    book_i18n.extract(pot_dir)
    return pot_dir


# --- what a translation must keep -------------------------------------------------------------

ENGLISH = ("The loss $\\mathcal{L}$ of `sft_loss(logits)` falls from 0.73 to 0.031 in 12 steps "
           "(see {chapter}`3 LoRA <chapters/03_lora>` and [PEFT](https://github.com/huggingface/peft)).")
FAITHFUL = ("`sft_loss(logits)` 的损失 $\\mathcal{L}$ 在 12 步内从 0.73 降到 0.031"
            "（见 {chapter}`第 3 章 LoRA <chapters/03_lora>` 和 [PEFT](https://github.com/huggingface/peft)）。")


def entry(msgid: str, msgstr: str, comment: str = "") -> polib.POEntry:
    return polib.POEntry(msgid=msgid, msgstr=msgstr, tcomment=comment)


def test_a_faithful_translation_passes():
    assert book_i18n.check_entry(entry(ENGLISH, FAITHFUL), {}) == []


@pytest.mark.parametrize("changed, kind", [
    (FAITHFUL.replace("$\\mathcal{L}$", "L"), "math"),
    (FAITHFUL.replace("`sft_loss(logits)` 的", "sft_loss 的"), "code"),
    (FAITHFUL.replace("0.031", "0.03"), "number"),
    (FAITHFUL.replace("在 12 步内", "在十二步内"), "number"),
    (FAITHFUL.replace("。", "，共 2 个实验。"), "number"),
    (FAITHFUL.replace("<chapters/03_lora>", "<chapters/04_prefix_tuning>"), "role target"),
    (FAITHFUL.replace("https://github.com/huggingface/peft", "https://example.org"), "link"),
])
def test_a_translation_that_changes_a_span_is_named(changed, kind):
    problems = book_i18n.check_entry(entry(ENGLISH, changed), {})
    assert len(problems) == 1 and problems[0].startswith(f"{kind} spans differ"), problems


def test_untranslated_fuzzy_and_english_only_messages_are_named():
    assert book_i18n.check_entry(entry(ENGLISH, ""), {}) == ["no translation"]
    fuzzy = entry(ENGLISH, FAITHFUL)
    fuzzy.flags.append("fuzzy")
    assert book_i18n.check_entry(fuzzy, {})[0].startswith("fuzzy")
    assert book_i18n.check_entry(entry(ENGLISH, ENGLISH), {})[0].startswith("no Chinese")
    assert book_i18n.check_entry(entry("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct",
                                       book_i18n.SAME), {}) == []


def test_a_numbered_heading_keeps_its_number_escaped():
    # "1. Title" in Markdown would be a list: the Chinese writes "1\. 标题".
    assert book_i18n.check_entry(entry("1. Teacher forcing", "1\\. 教师强制"), {}) == []


@pytest.mark.parametrize("msgid, neutral", [
    ("0.73", True), ("`sft_loss`", True), ("$\\beta = 0.1$", True), ("12.5 s", True),
    ("教师强制", True), ("3 x 4", True), ("ours", False), ("LoRA r 8", False),
])
def test_messages_with_nothing_to_translate(msgid, neutral):
    assert book_i18n.nothing_to_translate(msgid) is neutral


# --- glossary terms ---------------------------------------------------------------------------

# The Chinese terms of the study notes the book follows (where the notes use one), and the four
# the Chinese edition was asked to use; the glossary must give exactly these.
NOTES_TERMS = {
    "token": "token", "LM head": "LM head", "cross-entropy": "交叉熵",
    "log-sum-exp trick": "log-sum-exp 技巧", "numerical stability": "数值稳定",
    "learning rate": "学习率", "virtual token": "虚拟 token", "trainable parameter count": "可训练参数量",
    "hallucination": "幻觉", "continued pre-training": "继续预训练", "long tail": "长尾",
    "policy model": "策略模型", "reference model": "参考模型", "implicit reward": "隐式奖励",
    "KL divergence": "KL 散度", "dynamic coefficient": "动态系数", "harmlessness": "无害性",
    "reinforcement learning": "强化学习",
}
REQUIRED_TERMS = {"teacher forcing": "教师强制", "logprobs": "对数概率", "prefix-tuning": "前缀微调",
                  "implicit reward": "隐式奖励"}


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def test_the_glossary_uses_the_notes_terms():
    terms = book_i18n.glossary_terms()
    assert {en: terms.get(en) for en in REQUIRED_TERMS} == REQUIRED_TERMS
    assert {en: terms.get(en) for en in NOTES_TERMS} == NOTES_TERMS
    if NOTES.exists():
        notes = squash(NOTES.read_text(encoding="utf-8"))
        missing = [zh for zh in NOTES_TERMS.values() if squash(zh) not in notes]
        assert not missing, f"not the notes' wording: {missing}"


def test_a_glossary_term_left_out_is_named():
    terms = book_i18n.term_patterns()
    good = entry("Teacher forcing feeds the data's tokens.", "教师强制把数据中的 token 喂给模型。")
    assert book_i18n.check_entry(good, terms) == []
    bad = entry("Teacher forcing feeds the data's tokens.", "训练时把数据中的 token 喂给模型。")
    assert book_i18n.check_entry(bad, terms) == ["the glossary's Chinese for 'teacher forcing' is '教师强制', "
                                                  "missing here"]
    # Variants and plurals count: "log-probs" is the glossary's "logprobs".
    assert book_i18n.check_entry(entry("Token log-probs.", "token 的概率。"), terms) \
        == ["the glossary's Chinese for 'logprobs' is '对数概率', missing here"]


# --- the committed catalogues -----------------------------------------------------------------

def test_every_page_of_the_book_has_a_catalogue(pots):
    pages = sorted(str(p.relative_to(pots).with_suffix("")) for p in pots.rglob("*.pot"))
    assert set(toc_files()) <= set(pages)
    missing = [p for p in pages if not book_i18n.po_path(p, ROOT / "locale").exists()]
    assert not missing, f"pages without a catalogue: {missing}"


def test_checking_a_page_that_does_not_exist_is_an_error(pots):
    with pytest.raises(ValueError, match=r"--page 'chapters/03_lorra' is not a page of the book; the pages are: "
                                         r"chapters/01_teacher_forcing, "):
        book_i18n.check(pots, ROOT / "locale", ["chapters/03_lorra"])


def test_the_chinese_edition_is_complete_and_faithful(pots):
    """Every message translated, none fuzzy, math/code/numbers kept, glossary terms used."""
    problems = book_i18n.check(pots, ROOT / "locale")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(map(str, problems[:30]))


def test_every_glossary_term_is_rendered_with_its_chinese(pots):
    """Counted over the whole edition: each term the English uses appears in Chinese as the glossary says."""
    terms = book_i18n.term_patterns()
    used: dict[str, int] = {}
    for pot_file in pots.rglob("*.pot"):
        page = str(pot_file.relative_to(pots).with_suffix(""))
        chinese = {e.msgid: e for e in polib.pofile(str(book_i18n.po_path(page, ROOT / "locale")))}
        for message in polib.pofile(str(pot_file)):
            translated = chinese.get(message.msgid)
            if translated is None or book_i18n.SAME in (translated.tcomment or ""):
                continue
            english, _ = book_i18n.strip_spans(message.msgid)
            rendered, _ = book_i18n.strip_spans(translated.msgstr)
            for zh, (names, pattern) in terms.items():
                if pattern.search(english):
                    assert squash(zh) in squash(rendered), f"{page}: {names} not as {zh!r}: {translated.msgstr!r}"
                    used[zh] = used.get(zh, 0) + 1
    for zh in REQUIRED_TERMS.values():
        assert used.get(zh, 0) >= 3, f"{zh!r} is rendered in {used.get(zh, 0)} messages only"


# --- no drift ---------------------------------------------------------------------------------

def copy_of_the_book(dest: Path) -> Path:
    skip = shutil.ignore_patterns(".git", ".venv", "_build", "*.mo", "__pycache__", ".pytest_cache",
                                  ".ipynb_checkpoints", "vendor", "data", "lib", "tests")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def test_an_english_edit_without_its_chinese_stops_the_build(tmp_path):
    book = copy_of_the_book(tmp_path / "book")
    added = "A paragraph added to the English glossary, with no Chinese yet."
    glossary = book / "glossary.md"
    glossary.write_text(glossary.read_text(encoding="utf-8") + f"\n{added}\n", encoding="utf-8")
    before = "(Ctrl+F) in either language."
    assert before in glossary.read_text(encoding="utf-8")
    glossary.write_text(glossary.read_text(encoding="utf-8").replace(before, "(Ctrl+F, or Cmd+F) in either language."),
                        encoding="utf-8")
    script = [sys.executable, str(book / "scripts" / "book_i18n.py")]
    updated = subprocess.run([*script, "update"], cwd=book, capture_output=True, text=True, timeout=300)
    assert updated.returncode == 0, updated.stderr[-2000:]
    out = tmp_path / "zh"
    built = subprocess.run([*script, "build", "--out", str(out)], cwd=book, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 1, built.stdout[-2000:] + built.stderr[-2000:]
    report = built.stderr
    assert "The Chinese edition is not built: 2 message(s)" in report, report[-2000:]
    assert f"glossary (glossary.md:" in report
    assert f"no translation\n    English: {added!r}" in report
    assert "fuzzy: the English changed since it was translated\n    English: 'The terms of this book" in report
    assert not (out / "glossary.html").exists()
    # `update` kept the old Chinese of the edited paragraph, marked fuzzy, for the translator.
    po = polib.pofile(str(book_i18n.po_path("glossary", book / "locale")))
    edited = next(e for e in po if "Cmd+F" in e.msgid)
    assert "fuzzy" in edited.flags and book_i18n.CJK.search(edited.msgstr)


def test_bold_that_chinese_punctuation_keeps_from_closing_is_named():
    # CommonMark does not close ** after a full-width parenthesis when a letter follows.
    english = "Add knowledge in **continued pre-training (CPT)**, then SFT."
    assert book_i18n.check_entry(entry(english, "在**继续预训练**（CPT）中加入知识，再做 SFT。"), {}) == []
    broken = book_i18n.check_entry(entry(english, "在**继续预训练（CPT）**中加入知识，再做 SFT。"), {})
    assert len(broken) == 1 and broken[0].startswith("bold/italic differ"), broken


# --- one Chinese word per concept -------------------------------------------------------------

def test_the_word_table_names_the_word_a_translation_should_use():
    words = book_i18n.word_table()
    chosen = {w.english: w.chinese for w in words}
    assert chosen["seed"] == "随机种子" and chosen["prompt masking"] == "prompt 掩码"
    for text, bad in [("用 3 个种子", "种子"), ("精度 50 %", "50 %"), ("见原始笔记", "原始笔记"),
                      ("提示部分不计损失", "提示部分不计损失"), ("屏蔽prompt", "屏蔽prompt"), ("素数", "素数")]:
        problems = book_i18n.avoided_words(text, words)
        assert len(problems) == 1 and problems[0].startswith(f"writes {bad!r}"), (text, problems)
    # The chosen word is no variant of itself ("种子" inside "随机种子"), nor is code or math.
    for text in ["3 个随机种子", "精度 50%", "笔记说", "prompt 掩码", "`few-shot` 与 $50 \\%$"]:
        assert book_i18n.avoided_words(text, words) == [], text
    # The check of a message uses the table.
    message = entry("3 seeds.", "3 个种子。")
    assert book_i18n.check_entry(message, {}, words) == [
        "writes '种子' ('种子'): the glossary's Chinese for 'seed' is '随机种子'"]


# --- figures and table headers ----------------------------------------------------------------

def svg_of(draw) -> str:
    """A figure drawn by `draw(ax)` in the book's style, as the notebooks save it."""
    import io

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from llmbook import plots

    plots.use_style()
    fig, ax = plt.subplots()
    draw(ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue().decode()


def notebook_with(tmp_path: Path, *data: dict) -> Path:
    outputs = [{"output_type": "display_data", "data": d, "metadata": {}} for d in data]
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": "x"},
                                          {"cell_type": "code", "source": "", "outputs": outputs}]}))
    return path


def draw_losses(ax):
    ax.plot([1, 2, 3], [3.0, 1.0, 2.0], label="ours")
    ax.plot([1, 2, 3], [2.0, 2.0, 1.0], label="$\\beta = 0.1$")
    ax.set(xlabel="step", ylabel="loss (nats)", title="Training loss")
    ax.legend()


TABLE = ("<table><thead><tr><th></th><th>held-out accuracy</th><th>0.5</th></tr></thead>"
         "<tbody><tr><th>ours</th><td>0.8</td></tr></tbody></table>")


def test_every_line_of_figure_text_and_every_column_header_is_a_message(tmp_path):
    path = notebook_with(tmp_path, {"image/svg+xml": svg_of(draw_losses)}, {"text/html": TABLE})
    messages, mixed = book_i18n.output_messages(path)
    # Tick labels (numbers) and the formula are not messages; row labels (the index) are not either.
    assert sorted(messages) == sorted([(0, book_i18n.FIGURE, "ours"), (0, book_i18n.FIGURE, "step"),
                                       (0, book_i18n.FIGURE, "loss (nats)"),
                                       (0, book_i18n.FIGURE, "Training loss"),
                                       (0, book_i18n.TABLE, "held-out accuracy")]), messages
    assert mixed == []


def test_a_formula_with_words_in_it_is_named(tmp_path):
    def draw(ax):
        ax.plot([0, 1], [0, 1])
        ax.set(xlabel="$r_w - r_l$ (implicit reward margin)", ylabel="$\\log \\pi / \\pi_{ref}$")

    _, mixed = book_i18n.output_messages(notebook_with(tmp_path, {"image/svg+xml": svg_of(draw)}))
    assert len(mixed) == 1 and "implicit" in mixed[0][1], mixed


def test_the_chinese_build_translates_figures_and_table_headers(tmp_path):
    out, locale = tmp_path / "zh", tmp_path / "locale"
    (out / "_images").mkdir(parents=True)
    (out / "chapters").mkdir()
    svg = svg_of(draw_losses)
    (out / "_images" / "f.svg").write_text(svg, encoding="utf-8")
    (out / "chapters" / "x.html").write_text(f'<img alt="" src="../_images/f.svg" />{TABLE}', encoding="utf-8")
    po = polib.POFile()
    for english, chinese, kind in [("Training loss", "训练损失", book_i18n.FIGURE), ("step", "步", book_i18n.FIGURE),
                                   ("held-out accuracy", "留出集准确率", book_i18n.TABLE)]:
        po.append(polib.POEntry(msgid=english, msgstr=chinese, comment=kind))
    path = book_i18n.po_path("chapters/x", locale)
    path.parent.mkdir(parents=True)
    po.save(str(path))
    assert book_i18n.translate_outputs(out, locale, ["chapters/x"]) == 3
    translated = (out / "_images" / "f.svg").read_text(encoding="utf-8")
    lines, _ = book_i18n._svg_lines(translated)
    texts = {e.text for e in lines}
    assert {"训练损失", "步", "ours", "loss (nats)"} <= texts and "Training loss" not in texts
    assert "Noto Sans CJK SC" in translated
    page = (out / "chapters" / "x.html").read_text(encoding="utf-8")
    assert "<th>留出集准确率</th>" in page and "<th>ours</th>" in page
    # Run again (an incremental build): nothing is left to replace, nothing breaks.
    assert book_i18n.translate_outputs(out, locale, ["chapters/x"]) == 0


@pytest.mark.parametrize("align, anchor", [("center", "middle"), ("right", "end"), ("left", None)])
def test_a_translated_line_of_a_multi_line_text_keeps_its_alignment(align, anchor):
    # matplotlib writes each line of a multi-line text at its left end, without an anchor.
    def draw(ax):
        ax.text(0.5, 0.5, "first line\nthe second, longer line", ha=align)

    svg = svg_of(draw)
    english = {e.text: e for e in book_i18n._svg_lines(svg)[0] if e.text in ("first line", "the second, longer line")}
    assert len(english) == 2 and all("text-anchor" not in e.get("style") for e in english.values())
    translated, done = book_i18n._translate_svg(svg, {"first line": "第一行"})
    assert done == 1
    line = next(e for e in book_i18n._svg_lines(translated)[0] if e.text == "第一行")
    x = lambda e: float(re.search(r"translate\(([-\d.e]+)", e.get("transform")).group(1))  # noqa: E731
    if anchor is None:
        assert "text-anchor" not in line.get("style") and x(line) == x(english["first line"])
    else:
        # The anchor sits where the English line's centre (or right end) was: the same for both lines.
        assert f"text-anchor: {anchor}" in line.get("style")
        share = 0.5 if anchor == "middle" else 1.0
        other = english["the second, longer line"]
        assert x(line) == pytest.approx(x(other) + share * book_i18n._width(other.text, other.get("style")), abs=0.01)
