"""A small Sphinx extension for this book (loaded from _config.yml as a local extension).

- The ``chapter`` role links to a chapter only when that chapter is part of the build:
  {chapter}`LoRA <chapters/03_lora>` is a link once ``chapters/03_lora`` is listed in
  ``_toc.yml``, and plain text before. The intro's chapter map and the glossary use it,
  so they name every chapter of the plan and link exactly those that exist.
- Pages that use the role are re-read on every build, because what they link depends on
  ``_toc.yml``, not on their own text.
- On pages with widgets, RequireJS is told where the ipywidgets HTML manager lives
  (``_static/html-manager/``, where scripts/fetch_book_assets.sh puts its script and its
  fonts): the manager loads its fonts from its own module URL, which RequireJS would
  otherwise place next to the page, where there is nothing. And the widgets, written for
  MathJax 2, get the one MathJax 2 call they make, passed on to MathJax 3.
- Every page links to the same page in the other language: the English edition is built
  into ``_build/html/``, the Chinese one (``language = "zh_CN"``, scripts/book_i18n.py)
  into ``_build/html/zh/``. The link sits at the top of the article, and the page's head
  names its counterpart as a ``rel="alternate"`` with ``hreflang``.
- The Chinese edition's part captions are translated from the root page's catalogue
  (sphinx-external-toc adds its toctrees after Sphinx's own translation step).
- Inline scripts that two extensions both add (the book theme and sphinx-thebe each add
  the thebe settings) are written once per page: twice, the second ``const`` declaration
  is a JavaScript error in the reader's console.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.addnodes import pending_xref
from sphinx.util.docutils import SphinxRole
from sphinx.util.nodes import split_explicit_title

_ENV_KEY = "llmbook_chapter_role_docs"


class ChapterRole(SphinxRole):
    """``{chapter}`Title <path/to/doc>``: a link when the document is built, else the bare title."""

    def run(self):
        has_title, title, target = split_explicit_title(self.text)
        docname = target.strip().lstrip("/")
        for suffix in (".ipynb", ".md"):
            docname = docname.removesuffix(suffix)
        if not hasattr(self.env, _ENV_KEY):
            setattr(self.env, _ENV_KEY, set())
        getattr(self.env, _ENV_KEY).add(self.env.docname)
        if docname in self.env.found_docs:
            node = pending_xref(self.rawtext, refdomain="std", reftype="doc", reftarget="/" + docname,
                                refexplicit=has_title, refwarn=True, refdoc=self.env.docname)
            node += nodes.inline(self.rawtext, title, classes=["xref", "std", "std-doc"])
            return [node], []
        # Not written yet (or not in _toc.yml): the title alone, marked for the stylesheet and tests.
        return [nodes.inline(self.rawtext, title, classes=["chapter-pending"])], []


def _purge(app, env, docname):
    getattr(env, _ENV_KEY, set()).discard(docname)


def _merge(app, env, docnames, other):
    setattr(env, _ENV_KEY, getattr(env, _ENV_KEY, set()) | getattr(other, _ENV_KEY, set()))


def _reread_role_users(app, env, added, changed, removed):
    return sorted(d for d in getattr(env, _ENV_KEY, set()) if d in env.found_docs)


# Written after require.js on pages with widgets. First, where the widget manager's module
# lives (an absolute URL, so that it holds on pages at any depth). Second, the widgets'
# controls typeset their labels with MathJax 2's `MathJax.Hub.Queue`, an error under
# MathJax 3: a `Hub` that hands the element to MathJax 3's typesetter, set on the config
# object now and on the MathJax object once MathJax has started.
WIDGET_PAGE_JS = """\
require.config({paths: {'@jupyter-widgets/html-manager/dist': new URL(
  (document.documentElement.dataset.content_root || '') + '_static/html-manager', document.baseURI).href}});
(function () {
  var hub = {Queue: function (job) {
    var element = job && job[2];
    if (window.MathJax && MathJax.typesetPromise) {
      return MathJax.typesetPromise(element ? [element] : undefined).catch(function () {});
    }
  }};
  var config = window.MathJax = window.MathJax || {};
  config.Hub = config.Hub || hub;
  config.startup = config.startup || {};
  var ready = config.startup.ready;
  config.startup.ready = function () {
    if (ready) { ready(); } else { MathJax.startup.defaultReady(); }
    MathJax.Hub = MathJax.Hub || hub;
  };
})();"""


def _fix_page_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for script in sorted(scripts, key=lambda js: getattr(js, "priority", 500)):
        # An inline script is registered once with filename None and copied once with "".
        key = (str(getattr(script, "filename", script) or ""),
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    for i, script in enumerate(unique):
        if str(getattr(script, "filename", "") or "").endswith("require.js"):
            unique.insert(i + 1, type(script)("", priority=script.priority, body=WIDGET_PAGE_JS))
            break
    context["script_files"] = unique


# The two editions: the English at the site's root, the Chinese in its folder `zh/`.
CHINESE_FOLDER = "zh"


def _language_link(app, pagename, templatename, context, doctree):
    """A link to this page in the other edition, at the top of the article and in the head."""
    if "body" not in context:
        return
    chinese = (app.config.language or "en").startswith("zh")
    up = "../" * pagename.count("/")
    if chinese:
        href, label, lang, name = f"{up}../{pagename}.html", "English", "en", "English edition"
    else:
        href, label, lang, name = f"{up}{CHINESE_FOLDER}/{pagename}.html", "中文", "zh-CN", "中文版"
    context["body"] = (f'<p class="llmbook-language" style="text-align: right; margin: 0">'
                       f'<a class="llmbook-language-link" href="{href}" hreflang="{lang}" lang="{lang}" '
                       f'title="{name}">{label}</a></p>\n' + context["body"])
    context["metatags"] = (context.get("metatags", "")
                           + f'\n    <link rel="alternate" hreflang="{lang}" href="{href}" />')


def _translate_toc_captions(app, doctree):
    """The Chinese edition's part captions ("Foundations"...) from the root page's catalogue.

    sphinx-external-toc inserts the toctrees after Sphinx has translated the page, so their
    captions would stay English; gettext extracts them into the root page's catalogue.
    """
    if not app.config.language or app.config.language.startswith("en") or not app.config.locale_dirs:
        return
    from sphinx.locale import init as init_locale
    from sphinx.util.i18n import docname_to_domain

    dirs = [str(Path(app.srcdir, d)) for d in app.config.locale_dirs]
    domain = docname_to_domain(app.env.docname, app.config.gettext_compact)
    catalog, found = init_locale(dirs, app.config.language, domain)
    if not found:
        return
    for toctree in doctree.findall(addnodes.toctree):
        if toctree.get("caption"):
            toctree["caption"] = toctree["rawcaption"] = catalog.gettext(toctree["caption"])


def setup(app):
    app.add_role("chapter", ChapterRole())
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-get-outdated", _reread_role_users)
    # Late priority: run after the theme has added its page scripts.
    app.connect("html-page-context", _fix_page_scripts, priority=900)
    app.connect("html-page-context", _language_link)
    app.connect("doctree-read", _translate_toc_captions)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
