import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmbook import plots, utils
from llmbook.utils import seed_everything, time_call, time_interleaved


def test_smooth_equals_a_trailing_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    expected = [np.mean(values[max(0, i - 2): i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(plots.smooth(values, 3), expected)
    with pytest.raises(ValueError, match="window"):
        plots.smooth(values, 0)


def test_plot_history_refuses_gaps():
    with pytest.raises(ValueError, match="missing"):
        plots.plot_history({"step": [1, 2], "loss": [1.0, float("nan")]})


def test_seed_everything_matches_torch_manual_seed():
    seed_everything(123)
    ours = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(ours, torch.rand(3))
    g = seed_everything(5)
    torch.testing.assert_close(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(5)))


def test_time_call_counts_runs_and_measures_sleep():
    import time

    calls = []
    seconds = time_call(lambda: (calls.append(1), time.sleep(0.01)), repeat=3, warmup=2)
    assert len(calls) == 5 and 0.009 < seconds < 0.5
    with pytest.raises(ValueError, match="repeat"):
        time_call(lambda: None, repeat=0)


def test_time_interleaved_gives_one_time_per_label_and_alternates_the_order():
    import time

    order = []
    seconds = time_interleaved({"short": lambda: (order.append("short"), time.sleep(0.002)),
                                "long": lambda: (order.append("long"), time.sleep(0.02))}, repeat=3, warmup=1)
    assert list(seconds) == ["short", "long"] and all(s > 0 for s in seconds.values())
    assert 0.019 < seconds["long"] < 0.5
    # 1 warm-up + 3 timed rounds, every other round in reverse order
    assert order == ["short", "long", "long", "short"] * 2
    fastest = time_interleaved({"a": lambda: None}, repeat=2, warmup=0, statistic="min")
    assert list(fastest) == ["a"] and fastest["a"] >= 0


def test_time_interleaved_runs_setup_untimed_before_every_run():
    import time

    events = []
    seconds = time_interleaved({"step": lambda: events.append("step"), "other": lambda: events.append("other")},
                               setup={"step": lambda: (events.append("setup"), time.sleep(0.03))},
                               repeat=3, warmup=1)
    assert events == ["setup", "step", "other", "other", "setup", "step"] * 2
    assert 0 < seconds["step"] < 0.03  # the setup's sleep is not counted


_RAN = []


def _records():
    _RAN.append(1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(fns=_records), TypeError, "fns must be a dict of label -> callable, got function"),
    (dict(fns={}), ValueError, "fns is empty"),
    (dict(fns={"ours": _records, "reference": 3}), TypeError, r"fns\['reference'\] must be callable"),
    (dict(fns={1: _records}), TypeError, "fns' labels must be strings"),
    (dict(fns={"ours": _records}, repeat=0), ValueError, "repeat must be >= 1"),
    (dict(fns={"ours": _records}, repeat=2.5), TypeError, "repeat must be an integer"),
    (dict(fns={"ours": _records}, warmup=-1), ValueError, "warmup must be >= 0"),
    (dict(fns={"ours": _records}, statistic="mean"), ValueError, "statistic must be one of"),
    (dict(fns={"ours": _records}, setup=[_records]), TypeError, "setup must be a dict of label -> callable"),
    (dict(fns={"ours": _records}, setup={"theirs": _records}), ValueError,
     r"setup's labels must be labels of fns \['ours'\], got \['theirs'\]"),
    (dict(fns={"ours": _records}, setup={"ours": None}), TypeError, r"setup\['ours'\] must be callable"),
])
def test_time_interleaved_refuses_bad_arguments(kwargs, error, message):
    _RAN.clear()
    with pytest.raises(error, match=message):
        time_interleaved(**kwargs)
    assert not _RAN, "nothing runs before the arguments are checked"


_PEAK_CHILD = """
import json, sys, torch
from llmbook.utils import peak_bytes
device, size = sys.argv[1], 64 * 2**20

def allocate():
    block = torch.ones(size // 4, dtype=torch.float32, device=device)  # written, so resident
    assert block.sum().item() == size // 4

print(json.dumps({"peak": peak_bytes(allocate, device), "idle": peak_bytes(lambda: None, device)}))
"""


def test_peak_bytes_sees_a_freed_allocation(device):
    """A 64 MiB tensor made and dropped inside fn shows in the peak; an empty fn adds next to nothing.

    Measured in a fresh process, as the benchmarks do: in a long-lived one the allocator
    may hand back memory that earlier work left resident, which no peak can see.
    """
    size = 64 * 2**20
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, device.type], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert size <= result["peak"] < 2 * size
    assert result["idle"] < size // 4


# --- the numeric policy ------------------------------------------------------------------

@pytest.mark.parametrize("capability", ["AVX2", "avx2", "DEFAULT", "NO AVX"])
def test_an_avx2_only_cpu_has_no_native_bf16_whatever_onednn_says(capability):
    assert utils.cpu_has_native_bf16(capability, onednn_bf16=True) is False


def test_native_bf16_needs_a_vector_level_above_avx2_and_onednn_support():
    assert utils.cpu_has_native_bf16("AVX512", onednn_bf16=True) is True
    assert utils.cpu_has_native_bf16("AVX512", onednn_bf16=False) is False
    assert utils.cpu_has_native_bf16("SVE256", onednn_bf16=True) is True


def test_native_bf16_detection_follows_pytorchs_dispatch_level():
    # In this process: AVX2 or below (a real AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2) means no.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"):
        assert utils.cpu_has_native_bf16() is False
    else:
        assert utils.cpu_has_native_bf16() is torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_native_bf16_detection_under_avx2_emulation_in_a_fresh_process():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    code = "from llmbook import utils; print(utils.cpu_capability(), utils.cpu_has_native_bf16())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "False"]


def test_tolerances_grow_as_precision_falls_and_with_depth():
    for kind in utils.TOLERANCES:
        order = [utils.tolerance(d, kind)["rtol"] for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
        assert order == sorted(order) and len(set(order)) == 4
        # each tolerance is at least one unit in the last place of its dtype, and far below 1
        for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            assert torch.finfo(d).eps <= utils.tolerance(d, kind)["rtol"] < 0.2
    for d in (torch.float32, torch.bfloat16):
        assert utils.tolerance(d, "model")["rtol"] >= utils.tolerance(d, "op")["rtol"]


def test_a_real_mistake_fails_the_model_tolerance():
    # The smallest mistake the chapters guard against: a logit off by a 1 % scale error.
    logits = torch.linspace(-30, 40, 1000)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits * 1.01, logits, **utils.tolerance(torch.float32, "model"))


@pytest.mark.parametrize("dtype, kind, error", [(torch.float32, "loose", ValueError), (torch.int64, "op", ValueError),
                                                ("float32", "op", ValueError)])
def test_tolerance_rejects_bad_input(dtype, kind, error):
    with pytest.raises(error, match="kind|dtype"):
        utils.tolerance(dtype, kind)


def test_live_tensor_bytes_counts_new_storage_not_views():
    # Closed form: 1000 float32 = 4000 bytes; a view adds nothing; a second tensor adds 4000 more.
    from llmbook.utils import LiveTensorBytes

    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)
        view = a[:10]
        b = a * 2
        del view
    assert tracker.curve == [0, 4000, 4000, 8000]
    del a
    with LiveTensorBytes() as tracker:
        c = b + 1           # 4000 bytes alive
        del c
        d = b * 3           # c freed before this: the count stays at one tensor
    assert tracker.curve == [0, 4000, 4000] and d.numel() == 1000



def test_prefix_layout_draws_every_column_and_names_bad_counts():
    import matplotlib.pyplot as plt

    from llmbook import plots

    fig, ax = plt.subplots()
    plots.prefix_layout(["The", "sky", "is", "blue"], n_virtual=2, n_prompt=3, num_layers=30, ax=ax)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("none") == 2 and texts.count("K,V") == 6 * 3   # 6 columns x 3 drawn layers
    assert {"layer 30: K, V", "prefix (trainable)", "prompt", "output"} <= set(texts)
    assert "blue" in texts                                             # the last prompt token predicts it
    plt.close(fig)
    with pytest.raises(ValueError, match="n_prompt"):
        plots.prefix_layout(["a"], n_virtual=1, n_prompt=2, num_layers=2)


def test_token_strip_marks_the_highlighted_tokens():
    import matplotlib.pyplot as plt

    from llmbook import plots

    fig, ax = plt.subplots()
    plots.token_strip(ax, ["a", "b", "c"], 0, "row", [False, True, False])
    boxes = [t for t in ax.texts if t.get_text() in "abc"]
    colours = [t.get_bbox_patch().get_facecolor() for t in boxes]
    from matplotlib.colors import to_rgba
    assert colours[1] == to_rgba(plots.COLORS["inference"]) and colours[0] == to_rgba(plots.COLORS["neutral"])
    plt.close(fig)
    with pytest.raises(ValueError, match="highlight must have one entry per token"):
        plots.token_strip(ax, ["a"], 0, "row", [True, False])


def test_singular_spectra_and_token_losses_draw_what_they_are_given():
    import matplotlib.pyplot as plt

    from llmbook import plots

    sv = {"a": np.array([4.0, 2.0, 1.0]), "b": np.array([3.0, 3.0, 0.0])}
    axes = plots.singular_spectra(sv, np.array([1.0, 1.0, 1.0]), top=3)
    lines = axes[1].get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), [16 / 21, 20 / 21, 1.0])   # energy in the top r
    np.testing.assert_allclose(axes[0].get_lines()[1].get_ydata(), [1.0, 1.0, 0.0])  # sigma_i / sigma_1
    plt.close("all")
    with pytest.raises(ValueError, match="spectra must hold"):
        plots.singular_spectra({}, np.ones(3))

    fig, ax = plt.subplots()
    plots.token_losses(ax, [1.0, 2.0], [False, True], ["a\n", "b"], lines=[(1.5, "ours", "mean")])
    bars = ax.patches
    assert [b.get_height() for b in bars] == [1.0, 2.0]
    assert bars[1].get_facecolor() != bars[0].get_facecolor()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a\\n", "b"]
    plt.close(fig)
    with pytest.raises(ValueError, match="one entry per token"):
        plots.token_losses(ax, [1.0], [True, False], ["a"])


# --- counting work ------------------------------------------------------------------------

def test_count_flops_is_2mnk_per_product_and_counts_the_backward_pass():
    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(5, 7, requires_grad=True)
    assert utils.count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    # backward: dA = dC B^T and dB = A^T dC, two products of the same size
    assert utils.count_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 3 * 5 * 7
    assert utils.count_flops(lambda: torch.softmax(a, -1)) == 0  # elementwise work is not counted


def test_work_counter_counts_products_and_every_operator_call_and_nests():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    with utils.WorkCounter() as outer:
        with utils.WorkCounter() as inner:
            c = a @ b
        torch.relu(c + 1.0)  # two elementwise calls, no product
    assert (inner.flops, inner.products, inner.ops) == (2 * 3 * 5 * 7, 1, 1)
    assert (outer.flops, outer.products, outer.ops) == (2 * 3 * 5 * 7, 1, 3)
    # entered and left as two calls, as around a notebook cell
    counter = utils.WorkCounter()
    counter.__enter__()
    for _ in range(4):
        a @ b
    counter.__exit__(None, None, None)
    a @ b  # after it left: not counted
    assert (counter.flops, counter.products, counter.ops) == (4 * 2 * 3 * 5 * 7, 4, 4)


def test_count_flops_equals_pytorchs_flop_counter_on_a_model():
    from torch.utils.flop_counter import FlopCounterMode

    from llmbook.models import tiny_model

    model = tiny_model()
    model.set_attn_implementation("eager")  # attention as plain matrix products, in PyTorch's table
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with FlopCounterMode(display=False) as reference:
        model(ids).logits.sum().backward()
    assert utils.count_flops(lambda: model(ids).logits.sum().backward()) == reference.get_total_flops() > 0


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_count_flops_counts_cpu_attention_as_its_two_products(kv_heads):
    # PyTorch's table has no entry for its CPU attention kernel; ours counts Q K^T and P V,
    # as PyTorch counts the same products written out (grouped heads repeat their keys).
    b, h, s_q, s_k, d = 2, 4, 5, 7, 8
    q = torch.randn(b, h, s_q, d, requires_grad=True)
    k = torch.randn(b, kv_heads, s_k, d, requires_grad=True)
    v = torch.randn(b, kv_heads, s_k, d, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def written_out():
        rep = h // kv_heads
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / d**0.5
        return torch.softmax(scores, -1) @ v.repeat_interleave(rep, 1)

    fused = utils.count_flops(lambda: sdpa(q, k, v, enable_gqa=True))
    assert fused == utils.count_flops(written_out) == 2 * 2 * b * h * s_q * s_k * d
    # backward: the scores recomputed, then dP, dV, dQ, dK, as PyTorch counts its CUDA kernels
    both = utils.count_flops(lambda: sdpa(q, k, v, enable_gqa=True).sum().backward())
    assert both - fused == 2 * b * h * s_q * s_k * (3 * d + 2 * d)


def test_count_calls_counts_forward_calls_inside_the_block_only():
    layer = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2))
    with utils.count_calls(layer) as calls:
        for _ in range(3):
            layer(torch.ones(1, 2))
    layer(torch.ones(1, 2))
    assert calls.n == 3 and not layer._forward_pre_hooks


# --- the bootstrap over seeds and questions ------------------------------------------------

def test_paired_bootstrap_over_seeds_carries_the_spread_between_seeds():
    # Each seed's difference is the same on every question: resampling questions changes
    # nothing, so the interval comes from the seeds alone. The mean of 3 seeds drawn with
    # replacement is the smallest seed's value with probability 1/27 > 2.5 %, so the 95 %
    # interval runs exactly from the smallest seed's value to the largest's.
    per_seed = torch.tensor([0.10, -0.05, 0.02], dtype=torch.float64)
    a = per_seed[:, None].expand(3, 40) + 0.5
    b = torch.full((3, 40), 0.5, dtype=torch.float64)
    mean, low, high = utils.paired_bootstrap(a, b, seeds=True, resamples=20_000)
    assert mean == pytest.approx(per_seed.mean().item())
    assert low == pytest.approx(-0.05) and high == pytest.approx(0.10)
    # resampling questions only, the same data give an interval of zero width
    assert utils.paired_bootstrap(a, b) == pytest.approx((mean, mean, mean))


def test_paired_bootstrap_over_seeds_needs_seeds():
    with pytest.raises(ValueError, match="needs at least 2"):
        utils.paired_bootstrap(torch.ones(1, 5), torch.zeros(1, 5), seeds=True)
