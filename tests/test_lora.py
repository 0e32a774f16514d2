"""llmbook.lora against PEFT's LoRA, on the tiny model (fast) with fixed seeds."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llmbook import lora
from llmbook.models import tiny_model

IDS = torch.tensor([[5, 17, 3, 99, 42, 7], [1, 2, 3, 4, 5, 6]])


def pair(r=4, alpha=8, targets=("q_proj", "v_proj"), seed=0, use_rslora=False):
    """Our LoRA model and PEFT's, on identical base weights, with identical non-zero A and B."""
    base = tiny_model(seed=seed)
    ours = lora.apply_lora(copy.deepcopy(base), list(targets), r=r, lora_alpha=alpha, use_rslora=use_rslora)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                             lora_dropout=0.0, use_rslora=use_rslora))
    gen = torch.Generator().manual_seed(seed + 1)
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for name, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)):
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)  # B != 0
        peft_layer = peft_layers["base_model.model." + name]
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return base, ours, theirs


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_zero_init_changes_nothing():
    base = tiny_model()
    wrapped = lora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    layer = lora.lora_layers(wrapped)[0]
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    torch.testing.assert_close(logits(wrapped), logits(base), rtol=0, atol=0)


def test_initialisation_matches_peft_distribution():
    # PEFT initialises lora_A like nn.Linear (Kaiming-uniform, a=sqrt(5)): bound 1/sqrt(in_features).
    layer = lora.LoRALinear(torch.nn.Linear(256, 64), r=8, lora_alpha=16)
    bound = 1 / 256 ** 0.5
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize("r, alpha", [(1, 1), (4, 8), (8, 32)])
def test_same_A_and_B_give_peft_outputs(r, alpha):
    base, ours, theirs = pair(r=r, alpha=alpha)
    out = logits(ours)
    assert not torch.allclose(out, logits(base), atol=1e-4), "B is non-zero, so the output must change"
    torch.testing.assert_close(out, logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [1, 4, 8])
def test_rslora_scaling_and_outputs_match_peft(r):
    base, ours, theirs = pair(r=r, alpha=8, use_rslora=True)
    layer = lora.lora_layers(ours)[0]
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling == peft_layer.scaling["default"] == 8 / r ** 0.5
    torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_delta_weight_equals_peft_and_the_seed_notation():
    _, ours, theirs = pair(r=4, alpha=8)
    layer = lora.lora_layers(ours)[0]
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"))
    # The notes write W + A B alpha/r with A (in x r), B (r x out) acting on row vectors: the same update.
    a_seed, b_seed = layer.lora_A.weight.T, layer.lora_B.weight.T
    torch.testing.assert_close((a_seed @ b_seed * layer.scaling).T, layer.delta_weight())


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj")])
@pytest.mark.parametrize("r", [1, 2, 8])
def test_parameter_counts_equal_peft(r, targets):
    _, ours, theirs = pair(r=r, targets=targets)
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_all_linear_matches_peft_all_linear():
    base = tiny_model()
    ours = lora.apply_lora(copy.deepcopy(base), "all-linear", r=2, lora_alpha=4)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert lora.count_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_merge_unmerge_and_unload_match_peft():
    base, ours, theirs = pair()
    before = logits(ours)
    w0 = base.model.layers[0].self_attn.q_proj.weight.clone()
    lora.merge_lora(ours)
    torch.testing.assert_close(logits(ours), before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.base.weight, w0)
    lora.unmerge_lora(ours)
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.base.weight, w0, rtol=0, atol=1e-6)
    unloaded = lora.merge_lora(ours, unload=True)
    assert not lora.lora_layers(unloaded)
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(unloaded), logits(theirs.merge_and_unload()), rtol=1e-5, atol=1e-5)


def test_disable_lora_gives_the_base_model_like_peft():
    base, ours, theirs = pair()
    with lora.disable_lora(ours):
        torch.testing.assert_close(logits(ours), logits(base), rtol=0, atol=0)
    with theirs.disable_adapter():
        torch.testing.assert_close(logits(theirs), logits(base), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(ours), logits(base), atol=1e-4)  # re-enabled afterwards


def test_gradients_flow_only_into_lora_and_match_peft():
    _, ours, theirs = pair()
    for model in (ours, theirs):
        model(IDS, labels=IDS).loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in ours_grads)
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6)


def test_with_B_zero_only_B_gets_a_gradient():
    # dL/dA = scaling * B^T (dL/dy) x^T = 0 while B = 0, but dL/dB = scaling * (dL/dy) (A x)^T != 0.
    layer = lora.LoRALinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4)
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0, "lora_alpha": 8}, ValueError, "r must be"),
    ({"r": 2.5, "lora_alpha": 8}, TypeError, "r must be an integer"),
    ({"r": 100, "lora_alpha": 8}, ValueError, "at most"),
    ({"r": 2, "lora_alpha": 0}, ValueError, "lora_alpha"),
    ({"r": 2, "lora_alpha": 4, "lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ({"r": 2, "lora_alpha": 4, "use_rslora": 1}, TypeError, "use_rslora must be True or False"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        lora.LoRALinear(torch.nn.Linear(16, 16), **kwargs)


def test_bad_targets_and_double_application():
    model = tiny_model()
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.apply_lora(model, ["query"], r=2, lora_alpha=4)
    with pytest.raises(TypeError, match="nn.Linear"):
        lora.LoRALinear(torch.nn.Conv1d(2, 2, 1), r=1, lora_alpha=1)
    lora.apply_lora(model, ["q_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(model, ["v_proj"], r=2, lora_alpha=4)
    layer = lora.lora_layers(model)[0]
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_bf16_model_keeps_fp32_adapters_like_peft(device):
    base = tiny_model(device=device, dtype=torch.bfloat16)
    model = lora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = lora.lora_layers(model)[0]
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    # PEFT keeps half-precision models' adapters in float32 (autocast_adapter_dtype); so do we.
    assert layer.lora_A.weight.dtype == peft_layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_A.weight.device.type == device.type
    with torch.no_grad():  # the same non-zero adapters in both: the same bf16 logits
        for name, ours in model.named_modules():
            if isinstance(ours, lora.LoRALinear):
                peft_one = theirs.base_model.model.get_submodule(name)
                ours.lora_B.weight.normal_(0, 0.5)
                peft_one.lora_A["default"].weight.copy_(ours.lora_A.weight)
                peft_one.lora_B["default"].weight.copy_(ours.lora_B.weight)
    ids = IDS.to(device)
    out = model(ids, labels=ids)
    with torch.no_grad():
        ref = theirs(ids).logits
        base_logits = base(ids).logits
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits - base_logits).abs().max() > 0.1  # the adapters change the output
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and layer.lora_B.weight.grad.dtype == torch.float32


def test_a_target_that_is_not_linear_is_refused_like_peft():
    model = tiny_model()
    with pytest.raises(TypeError, match="LlamaMLP"):
        lora.apply_lora(model, ["mlp"], r=2, lora_alpha=4)
    with pytest.raises(TypeError, match="non-empty strings"):
        lora.apply_lora(model, ["q_proj", 3], r=2, lora_alpha=4)
    with pytest.raises(TypeError, match="lora_alpha must be a real number"):
        lora.LoRALinear(torch.nn.Linear(4, 4), r=1, lora_alpha=True)
    assert not lora.lora_layers(model), "a refused call leaves the model unchanged"
    # PEFT refuses the same target.
    with pytest.raises((ValueError, TypeError)):
        get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["mlp"]))


def test_merge_then_unmerge_restores_every_weight_within_1e_6():
    base, ours, _ = pair(r=8, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
    lora.merge_lora(ours)
    lora.unmerge_lora(ours)
    for name, layer in ours.named_modules():
        if isinstance(layer, lora.LoRALinear):
            torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(get_peft_model_with(ours)), rtol=1e-5, atol=1e-5)


def get_peft_model_with(ours):
    """PEFT's model on the base weights of ``ours`` (unmerged), with ``ours``'s A and B."""
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, lora.LoRALinear)}
    base = copy.deepcopy(ours)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, copy.deepcopy(layer.base))
    first = next(iter(layers.values()))
    theirs = get_peft_model(base, LoraConfig(r=first.r, lora_alpha=first.lora_alpha,
                                             target_modules=sorted({n.split(".")[-1] for n in layers})))
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return theirs


def test_dropout_is_only_active_in_training_like_peft():
    base = tiny_model()
    ours = lora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.5)
    for layer in lora.lora_layers(ours):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    ours.eval()
    first, second = logits(ours), logits(ours)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    ours.train()
    with torch.no_grad():
        assert not torch.allclose(ours(IDS).logits, first, atol=1e-5), "dropout changes the training forward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_singular_values_equal_those_of_the_full_delta(dtype):
    gen = torch.Generator().manual_seed(3)
    layer = lora.LoRALinear(torch.nn.Linear(24, 40, dtype=dtype), r=5, lora_alpha=7)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(40, 5, generator=gen, dtype=dtype))
    full = torch.linalg.svdvals(layer.delta_weight().detach().double())[:5]
    torch.testing.assert_close(layer.delta_singular_values().double(), full,
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    with torch.no_grad():
        layer.lora_B.weight[:, 0] = layer.lora_B.weight[:, 1]  # rank 4: one value falls to ~0
    sv = layer.delta_singular_values()
    assert sv[-1] <= 40 * torch.finfo(dtype).eps * sv[0]
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == 4
    torch.testing.assert_close((sv**2).sum(), layer.delta_weight().detach().norm() ** 2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    assert torch.count_nonzero(lora.LoRALinear(torch.nn.Linear(8, 8), r=2, lora_alpha=2)
                               .delta_singular_values()) == 0, "B = 0: no update, all values zero"
