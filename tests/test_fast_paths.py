"""The fast LTE layer (`lora.lte_linear`: one autograd Function, V folded into the base or
applied as one rank-2r product, cached bases) computes what the op-by-op reference
(`lora.lte_linear_plain`, impl="plain") computes: outputs and every gradient, for the stacked
engine's layer and the one-head client's, each branch taken for real."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lte_fed.lora import LoRALinear, StackedLoRALinear, fold_is_cheaper, set_impl
from lte_fed.lte import LTEConfig, parameterize, parameterize_head
from lte_fed.models import build_model
from lte_fed.rng import torch_generator

ALPHA, RANK = 9.0, 4  # s = 2.25: not a power of two, so a misplaced scale shows in the rounding


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _mid_training(layer, g):
    """B, V and the bias all non-trivial (right after init B = V = 0 would hide V's path)."""
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.bias.add_(torch.randn(layer.bias.shape, generator=g))
        if layer.corr_A is not None:
            layer.corr_A.copy_(torch.randn(layer.corr_A.shape, generator=g))
            layer.corr_B.copy_(torch.randn(layer.corr_B.shape, generator=g) * 0.3)


def _run(layer, x, gout, impl):
    """Output and gradients (x, A, B, bias) of one forward + backward with `impl`."""
    layer.impl = impl
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y * gout).sum().backward()
    return {"y": y.detach(), "x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad, "bias": layer.bias.grad}


def _assert_same(fast, plain, dtype):
    for k in plain:
        assert plain[k] is not None and plain[k].abs().max() > 0, k  # nothing vacuous
        torch.testing.assert_close(fast[k], plain[k], **_tol(dtype), msg=lambda m, k=k: f"{k}: {m}")


def _linear(n_in, n_out, g, dtype=torch.float32):
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
        lin.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
    return lin.to(dtype)


CASES = [("none", torch.float64), ("nf4", torch.float32)]


@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("quant,dtype", CASES)
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("fold_steps,ranks", [(False, None), (True, None), (True, [RANK, 2, 3])])
def test_stacked_fast_equals_plain(variant, quant, dtype, fold, fold_steps, ranks):
    """`fold_steps`: each head's s·B A folded into its base for the step (10 tokens per head:
    the cheaper matmul here), with one scale or per-head scales (heads of other ranks)."""
    N, g = 3, torch_generator(30)
    assert fold_is_cheaper(10, 12, 20)
    layer = StackedLoRALinear(_linear(20, 12, g), N, RANK, ALPHA, variant=variant, quant=quant,
                              generators=[torch_generator(31, n) for n in range(N)], fold=fold,
                              fold_steps=fold_steps, ranks=ranks)
    if dtype == torch.float64:
        layer = layer.double()
    _mid_training(layer, g)
    x = torch.randn(N * 2, 5, 20, generator=g, dtype=dtype)
    gout = torch.randn(N * 2, 5, 12, generator=g, dtype=dtype)
    _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), dtype)
    folded = fold_steps and (fold or variant == "reset")  # exact: only on top of the kept V folds
    assert ("_LTEFoldedLinear" in _layer_fn(layer, x)) == folded


def _layer_fn(layer, x) -> str:
    """The autograd node of the LTE layer's own Function in `layer(x)` (under its reshape)."""
    layer.impl = "fast"
    y = layer(x.detach().requires_grad_())
    return type(y.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("tokens", [3, 40])  # V applied as a rank-2r product / folded per use
def test_stacked_per_use_base_folds_only_where_it_pays_and_equals_plain(heads, tokens):
    """A node's stacked heads dequantize q(W) per use (cache_base off): V is folded into each use
    only where that is the cheaper matmul (one head: into the fresh dequantization), otherwise it
    goes to the tokens; either way the numbers are the reference's."""
    g, m, n = torch_generator(34), 12, 20
    layer = StackedLoRALinear(_linear(n, m, g), heads, RANK, ALPHA, variant="exact", quant="nf4",
                              generators=[torch_generator(35, h) for h in range(heads)])
    layer.cache_base = False
    _mid_training(layer, g)
    assert layer._fold_pays(tokens) == fold_is_cheaper(tokens, m, n) == (tokens == 40)
    x = torch.randn(heads * tokens, n, generator=g)
    gout = torch.randn(heads * tokens, m, generator=g)
    _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), torch.float32)


@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("quant,dtype", CASES)
@pytest.mark.parametrize("tokens", [3, 40])  # V applied as a rank-2r product / folded into the base
@pytest.mark.parametrize("cache", [False, True])
def test_one_head_fast_equals_plain(variant, quant, dtype, tokens, cache):
    g = torch_generator(32)
    m, n = 12, 20
    assert fold_is_cheaper(40, m, n) and not fold_is_cheaper(3, m, n)  # both branches run
    layer = LoRALinear(_linear(n, m, g), RANK, ALPHA, variant=variant, quant=quant, generator=torch_generator(33))
    if dtype == torch.float64:
        layer = layer.double()
    layer.cache_base = cache
    _mid_training(layer, g)
    x = torch.randn(tokens, n, generator=g, dtype=dtype)
    gout = torch.randn(tokens, m, generator=g, dtype=dtype)
    _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), dtype)
    if cache:  # the cached base follows a new q(W) and a new V (what a round brings)
        with torch.no_grad():
            new = layer.base.dequantize() + 0.1
            if quant == "none":  # as load_base_state does
                layer.base.set_parts({"weight": new})
            else:
                layer.base.set_weight(new)
            if layer.corr_A is not None:
                layer.corr_A.mul_(-1.5)
        _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), dtype)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_stacked_fold_follows_merges_and_loads(quant):
    """The per-head folded bases are a cache: after a merge (W, q(W), V all change) and after
    loading another state, the fast path still equals the plain one."""
    N, g = 2, torch_generator(34)
    layer = StackedLoRALinear(_linear(16, 8, g), N, RANK, ALPHA, variant="exact", quant=quant,
                              generators=[torch_generator(35, n) for n in range(N)])
    _mid_training(layer, g)
    x = torch.randn(N * 3, 16, generator=g)
    gout = torch.randn(N * 3, 8, generator=g)
    _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), torch.float32)
    layer.merge()
    with torch.no_grad():
        layer.lora_B.add_(0.2)  # a step after the merge, so that B A - V != 0 again
    _assert_same(_run(layer, x, gout, "fast"), _run(layer, x, gout, "plain"), torch.float32)
    other = copy.deepcopy(layer)
    _mid_training(other, torch_generator(36))
    other.merge()
    layer.load_state_dict(other.state_dict())
    _assert_same(_run(layer, x, gout, "fast"), _run(other, x, gout, "plain"), torch.float32)


def _vit():
    return build_model("vit_digits", num_classes=10, img_size=8, in_chans=1, seed=0)


@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("fold_max_bytes", [0, 2**40])
def test_whole_models_fast_equal_plain(variant, fold_max_bytes):
    """A whole stacked model and a one-head model, mid-training: the loss's gradients for every
    trainable tensor agree between the fast and the plain layers."""
    cfg = LTEConfig(heads=2, rank=RANK, alpha=ALPHA, variant=variant, quant="none", fold_max_bytes=fold_max_bytes)
    g = torch_generator(37)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    # float64: a deep net amplifies fp32 rounding; in float64 any real difference would still show.
    for model in (parameterize(_vit(), cfg).double(), parameterize_head(_vit(), cfg, head=1).double()):
        for layer in model.lora_layers().values():
            _mid_training(layer, g)
            if isinstance(layer, StackedLoRALinear):
                assert layer.fold == (fold_max_bytes > 0)
            else:  # the one-head model keeps W - s·V per layer within the same budget
                assert layer.cache_base == (fold_max_bytes > 0 and variant == "exact")
        grads = {}
        for impl in ("plain", "fast"):
            set_impl(model, impl)
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.square().mean().backward()
            grads[impl] = {"out": out.detach()} | {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for k, v in grads["plain"].items():
            torch.testing.assert_close(grads["fast"][k], v, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")


def _head_step(model, x):
    """Output and every trainable tensor's gradient of one forward + backward of `model`."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return {"out": out.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_head_kept_fold_leaves_the_base_as_it_is():
    """An fp32-base one-head model keeps W - s·V per layer (`one_head_keeps_fold`) as a cache
    beside W: what is sent, exported or merged (base_state, the state dict, q(W)'s parts) stays
    W bit for bit through training steps and a merge, the fold follows V, and every step equals
    the per-use fold's (fold_max_bytes=0) and the op-by-op reference's."""
    cfg = LTEConfig(heads=2, rank=RANK, alpha=ALPHA, variant="exact", quant="none")
    kept = parameterize_head(_vit(), cfg, head=1).double()  # float64: see the test above
    per_use = parameterize_head(_vit(), dataclasses.replace(cfg, fold_max_bytes=0), head=1).double()
    g = torch_generator(42)
    for layer in kept.lora_layers().values():
        _mid_training(layer, g)
    per_use.load_state_dict(kept.state_dict())
    assert all(l.cache_base for l in kept.lora_layers().values())
    assert not any(l.cache_base for l in per_use.lora_layers().values())
    base = {k: t.clone() for k, t in kept.base_state().items()}
    state = {k: t.clone() for k, t in kept.state_dict().items() if ".base." in k}
    assert base and state
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    for _ in range(2):
        for impl in ("fast", "plain"):
            set_impl(kept, impl)
            res = _head_step(kept, x)
            ref = _head_step(per_use, x)
            for k, v in ref.items():
                # Tolerance relative to the tensor's scale, not per element: "plain" and "fast" add
                # in different orders, and an element near cancellation (0.1 in a gradient of
                # scale 1e3) then differs by ~1e-9 in float64 (seen on an Intel Xeon: 4e-9 of the
                # element, 1e-12 of the scale); a real difference would be of the scale's order.
                tol = 1e-10 * max(1.0, float(v.abs().max()))
                torch.testing.assert_close(res[k], v, rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
        for layer in kept.lora_layers().values():
            w = layer.base.parts()["weight"]
            fold = layer.__dict__["_base_cache"][1]
            assert fold.data_ptr() != w.data_ptr()  # a copy beside W, never W itself
            W_minus_sV = w - layer.scale * layer.corr_B @ layer.corr_A
            torch.testing.assert_close(fold, W_minus_sV, rtol=1e-12, atol=1e-12)
        assert all(torch.equal(t, base[k]) for k, t in kept.base_state().items())
        assert all(torch.equal(kept.state_dict()[k], t) for k, t in state.items())
        kept.commit_merge()  # V <- B A: the fold must follow
        per_use.commit_merge()
        with torch.no_grad():
            for model in (kept, per_use):
                for layer in model.lora_layers().values():
                    layer.lora_B.add_(0.05)  # a step after the merge: B A - V != 0


def test_fast_path_is_deterministic():
    N, g = 2, torch_generator(38)
    layer = StackedLoRALinear(_linear(16, 8, g), N, RANK, ALPHA, variant="exact", quant="nf4",
                              generators=[torch_generator(39, n) for n in range(N)])
    _mid_training(layer, g)
    x = torch.randn(N * 3, 16, generator=g)
    gout = torch.randn(N * 3, 8, generator=g)
    a, b = _run(layer, x, gout, "fast"), _run(layer, x, gout, "fast")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stacked", [True, False])
def test_fast_path_under_autocast(stacked):
    """Under bf16 autocast (what run.precision=bf16 does on a GPU; here on the CPU) the fast path
    computes in bf16 like the plain one, and every gradient keeps its parameter's dtype."""
    g = torch_generator(40)
    lin = _linear(16, 8, g)
    layer = (StackedLoRALinear(lin, 2, RANK, ALPHA, quant="none", generators=[torch_generator(41, n) for n in range(2)])
             if stacked else LoRALinear(lin, RANK, ALPHA, quant="none", generator=torch_generator(41)))
    _mid_training(layer, g)
    x = torch.randn(4, 16, generator=g)
    res = {}
    for impl in ("plain", "fast"):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        res[impl] = (y.float().detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad)
        assert xi.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    for a, b in zip(res["fast"], res["plain"]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))
