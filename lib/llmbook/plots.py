"""One figure style for the whole book, and the few plots several chapters share.

Every chapter calls :func:`use_style` once; figures then share fonts, colours and
grid. Colours follow :data:`COLORS` so that, across chapters, the same role (say,
"ours" against "the reference library") keeps the same colour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib as mpl
import matplotlib.pyplot as plt

from llmbook._checks import check_int, check_real

__all__ = ["COLORS", "prefix_layout", "singular_spectra", "token_losses", "token_strip", "use_style", "subplots",
           "plot_history", "smooth"]

# Colour-blind-safe (Okabe-Ito); roles are fixed across chapters.
COLORS = {
    "ours": "#0072B2",
    "reference": "#E69F00",
    "train": "#0072B2",
    "inference": "#D55E00",
    "chosen": "#009E73",
    "rejected": "#D55E00",
    "neutral": "#666666",
}
_CYCLE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def use_style() -> None:
    """Set the book's matplotlib style (call once at the top of a chapter)."""
    mpl.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "figure.figsize": (6.4, 3.6),
            "figure.constrained_layout.use": True,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "axes.prop_cycle": mpl.cycler(color=_CYCLE),
            "image.cmap": "viridis",
            # Figures are SVG whose text stays text: the Chinese edition translates a
            # figure's title, labels and legend from the same executed notebook.
            "svg.fonttype": "none",
            "svg.hashsalt": "llmbook",
        }
    )
    _inline_svg()


def _inline_svg() -> None:
    """In a notebook, show figures as SVG (no creation date, so a re-run changes nothing)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is None:
        return
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("svg", metadata={"Date": None})


def subplots(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2, **kwargs):
    """``plt.subplots`` with a panel size in inches instead of a figure size."""
    ncols, nrows = check_int(ncols, "ncols", minimum=1), check_int(nrows, "nrows", minimum=1)
    width = check_real(width, "width", low=0.0, low_open=True, hint="(inches)")
    height = check_real(height, "height", low=0.0, low_open=True, hint="(inches)")
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def smooth(values, window: int):
    """Trailing moving average over ``window`` points (the first points average what exists)."""
    window = check_int(window, "window", minimum=1)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_history(history, key: str = "loss", *, ax=None, label: str | None = None, window: int = 1, **kwargs):
    """Plot one metric of a training :class:`~llmbook.train.History` against the step."""
    if ax is None:
        ax = subplots()[1][0, 0]
    if not isinstance(history, Mapping) or "step" not in history:
        raise TypeError(f"history must be the History that llmbook.train.train returns, got {type(history).__name__}")
    if key not in history:
        raise KeyError(f"key {key!r} is not a metric of this history; it has {sorted(history)}")
    values = [v for v in history[key]]
    if any(math.isnan(v) for v in values):
        raise ValueError(f"history[{key!r}] has missing values; log it at every step to plot it")
    ax.plot(history["step"], smooth(values, window) if window > 1 else values, label=label, **kwargs)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if label:
        ax.legend()
    return ax


def prefix_layout(tokens, n_virtual: int, n_prompt: int, num_layers: int, *, ax=None):
    """Chapter 4's picture of a prefix: which columns have an input token, keys and values, a prediction.

    ``tokens`` are the decoded prompt and output tokens, in order; they follow ``n_virtual``
    virtual tokens (``v1 ... vn``), which have keys and values in every layer and nothing
    else. Virtual tokens are drawn in :data:`COLORS` ``"ours"``, the prompt in ``"neutral"``,
    the output in ``"inference"``.
    """
    n_virtual = check_int(n_virtual, "n_virtual", minimum=1)
    n_prompt = check_int(n_prompt, "n_prompt", minimum=1, maximum=len(tokens))
    if ax is None:
        ax = plt.subplots(figsize=(11, 3.6))[1]
    columns = [f"v{i + 1}" for i in range(n_virtual)] + list(tokens)
    kinds = ["virtual"] * n_virtual + ["prompt"] * n_prompt + ["output"] * (len(tokens) - n_prompt)
    colour = {"virtual": COLORS["ours"], "prompt": COLORS["neutral"], "output": COLORS["inference"]}
    rows = ["predicts", f"layer {num_layers}: K, V", "⋮", "layer 2: K, V", "layer 1: K, V", "input token", "position"]
    text = dict(ha="center", va="center")
    for x, (name, kind) in enumerate(zip(columns, kinds)):
        filled = dict(boxstyle="round,pad=0.3", ec="none", fc=colour[kind])
        for y, row in enumerate(reversed(rows)):
            if row == "position":
                ax.text(x, y, str(x), fontsize=8, **text)
            elif row == "input token" and kind == "virtual":
                ax.text(x, y, "none", fontsize=7, color=colour[kind], **text,
                        bbox=dict(boxstyle="round,pad=0.3", fc="white", ec=colour[kind], ls="--"))
            elif row == "input token":
                ax.text(x, y, name, fontsize=8, color="white", bbox=filled, **text)
            elif row == "⋮":
                ax.text(x, y, "⋮", fontsize=9, **text)
            elif row != "predicts":
                ax.text(x, y, "K,V", fontsize=7, color="white", bbox=filled, **text)
            elif kind != "virtual" and x + 1 < len(columns):
                ax.text(x, y, columns[x + 1], fontsize=7, color=colour["output"], **text)
    for y, row in enumerate(reversed(rows)):
        ax.text(-0.8, y, row, ha="right", va="center", fontsize=9)
    ax.axvline(n_virtual - 0.5, color="black", lw=0.8, ls="--")
    ax.axvline(n_virtual + n_prompt - 0.5, color="black", lw=0.8, ls=":")
    top = len(rows) - 0.4
    ax.text(n_virtual / 2 - 0.5, top, "prefix (trainable)", ha="center", fontsize=9, color=colour["virtual"])
    ax.text(n_virtual + n_prompt / 2 - 0.5, top, "prompt", ha="center", fontsize=9)
    n_out = len(tokens) - n_prompt
    ax.text(n_virtual + n_prompt + n_out / 2 - 0.5, top, "output", ha="center", fontsize=9, color=colour["output"])
    ax.set(xlim=(-4.5, len(columns) - 0.5), ylim=(-0.6, len(rows) - 0.1))
    ax.axis("off")
    return ax


def token_strip(ax, tokens, y: float, label: str, highlight=None):
    """Draw ``tokens`` (strings) as a row of boxes at height ``y``, named ``label`` on the left.

    Boxes whose ``highlight`` entry is true are drawn in :data:`COLORS` ``"inference"``, the
    others in ``"neutral"`` (chapter 1: the tokens where inference departs from the data).
    """
    tokens = list(tokens)
    highlight = [False] * len(tokens) if highlight is None else list(highlight)
    if len(highlight) != len(tokens):
        raise ValueError(f"highlight must have one entry per token ({len(tokens)}), got {len(highlight)}")
    for x, (token, marked) in enumerate(zip(tokens, highlight)):
        colour = COLORS["inference"] if marked else COLORS["neutral"]
        ax.text(x, y, token, ha="center", va="center", fontsize=8, color="white",
                bbox=dict(boxstyle="round,pad=0.3", fc=colour, ec="none"))
    ax.text(-1, y, label, ha="right", va="center", fontsize=10)
    return ax


def singular_spectra(spectra, reference, *, axes=None, top: int = 64):
    r"""Chapter 3's two panels: singular values over the largest, and the energy in the top r.

    ``spectra`` maps a name to a matrix's singular values (descending, a 1-D tensor or array),
    drawn thin in :data:`COLORS` ``"ours"``; ``reference`` is one more spectrum (a random
    matrix's, say), drawn thick in ``"neutral"``. The right panel shows
    $\sum_{i \le r} \sigma_i^2 / \sum_i \sigma_i^2$ for $r \le$ ``top``.
    """
    import numpy as np

    top = check_int(top, "top", minimum=1)
    if not spectra:
        raise ValueError("spectra must hold at least one matrix's singular values")
    if axes is None:
        axes = subplots(2, width=4.6, height=3.2)[1][0]

    def draw(sv, **style):
        sv = np.asarray(sv, dtype=float)
        axes[0].plot(sv / sv[0], **style)
        axes[1].plot((np.cumsum(sv**2) / np.sum(sv**2))[:top], **{k: v for k, v in style.items() if k != "label"})

    for sv in spectra.values():
        draw(sv, color=COLORS["ours"], alpha=0.5, lw=1)
    draw(reference, color=COLORS["neutral"], lw=2, label="random matrix")
    axes[0].plot([], color=COLORS["ours"], label="ΔW of full fine-tuning")
    axes[0].set(xscale="log", yscale="log", xlabel="index i", ylabel="σ_i / σ_1", title="singular values of ΔW")
    axes[1].set(xlabel="r", ylabel="share of ‖ΔW‖²", title="energy in the top r directions", ylim=(0, 1))
    axes[0].legend()
    return axes


def token_losses(ax, losses, scored, tokens, *, lines=()):
    r"""One bar of $-\log p$ per token, :data:`COLORS` ``"ours"`` where it is ``scored``, else ``"neutral"``.

    ``tokens`` label the bars (newlines shown as ``\n``); ``lines`` are ``(value, colour role,
    label)`` triples drawn as dashed horizontal lines (chapter 2: the two mean losses).
    """
    import numpy as np

    losses, scored = np.asarray(losses, dtype=float), np.asarray(scored, dtype=bool)
    tokens = list(tokens)
    if not (len(losses) == len(scored) == len(tokens)):
        raise ValueError(f"losses, scored and tokens must have one entry per token, "
                         f"got {len(losses)}, {len(scored)} and {len(tokens)}")
    positions = np.arange(1, len(losses) + 1)
    ax.bar(positions, losses, color=np.where(scored, COLORS["ours"], COLORS["neutral"]))
    for value, role, label in lines:
        ax.axhline(value, color=COLORS[role], ls="--", lw=1, label=label)
    ax.set_xticks(positions, [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
    if lines:
        ax.legend(loc="upper right")
    return ax
