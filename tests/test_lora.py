"""LoRA layers and the merge: LTE == multi-head LoRA (paper A.2), merges, stacked == separate heads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lte_fed.lora import LoRALinear, StackedLoRALinear
from lte_fed.rng import torch_generator


def _linear(n_in: int, n_out: int, g: torch.Generator, bias: bool = True) -> nn.Linear:
    """An nn.Linear (n_out, n_in) whose weights come from `g`, not the global RNG."""
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
    return lin


class MHLoRALinear(nn.Module):
    """Multi-head LoRA written from paper eq. 2, independently of lte_fed:
    f(x) = W0 x + (s/N) Σ_n B_n A_n x + (1/N) Σ_n b_n.  W0 (m, n), A (N, r, n), bias (N, m).

    The bias is kept as N copies averaged in the forward (each copy then gets the gradient an
    LTE head's bias replica gets)."""

    def __init__(self, weight, bias, A, scale):
        super().__init__()
        self.register_buffer("W0", weight.detach().clone())
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(torch.zeros(A.shape[0], weight.shape[0], A.shape[1], dtype=weight.dtype))
        self.bias = nn.Parameter(bias.detach().clone())
        self.scale, self.N = scale, A.shape[0]

    def forward(self, x):
        out = x @ self.W0.T + self.bias.mean(0)
        for n in range(self.N):
            out = out + (self.scale / self.N) * (x @ self.A[n].T) @ self.B[n].T
        return out

    def effective_weight(self):
        return self.W0 + (self.scale / self.N) * sum(self.B[n] @ self.A[n] for n in range(self.N))


def _toy_pair(N, rank, alpha, variant="exact"):
    """The same 2-layer net (6 -> 10 -> tanh -> 4) as N-head LTE and as MHLoRA, in float64."""
    g = torch_generator(0, 1)
    lins = [_linear(6, 10, g), _linear(10, 4, g)]
    lte = [StackedLoRALinear(l, N, rank, alpha, variant=variant, quant="none",
                             generators=[torch_generator(0, 2, i, n) for n in range(N)]).double()
           for i, l in enumerate(lins)]
    mh = [MHLoRALinear(l.weight, l.bias, l.lora_A, l.scale) for l in lte]
    return nn.Sequential(lte[0], nn.Tanh(), lte[1]), nn.Sequential(mh[0], nn.Tanh(), mh[1])


def _run_pair(make_opt, steps=5, merge=True, N=3, rank=2, alpha=6.0):
    """Train LTE (batch repeated N times: every head sees the same batch) and MHLoRA side by side;
    yields both nets after each step."""
    lte, mh = _toy_pair(N, rank, alpha)
    opt_lte, opt_mh = make_opt(lte.parameters()), make_opt(mh.parameters())
    g = torch_generator(0, 3)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        out = lte(x.repeat(N, 1)).reshape(N, 8, 4)  # slice n is head n's output on the batch
        loss_lte = ((out - y) ** 2).mean(dim=(1, 2)).sum()  # Σ_n L_n: head n's grad is its own loss's
        loss_mh = N * ((mh(x) - y) ** 2).mean()  # the loss times N (see test docstring)
        for opt, loss in ((opt_lte, loss_lte), (opt_mh, loss_mh)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        if merge:
            for layer in (lte[0], lte[2]):
                layer.merge()
        yield lte, mh


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.01),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_lte_exact_T1_same_batch_equals_multihead_lora(opt):
    """LTE (exact variant, merge after every step, every head fed the same batch) follows
    multi-head LoRA step by step.

    Right after an exact merge every LTE head computes W(t) x with W(t) = W0 + (s/N) Σ B_n A_n,
    exactly MHLoRA's function, so both see the same output gradient G. But LTE head n's factor
    gradient is s·G·(A_n x)ᵀ while MHLoRA's is (s/N)·G·(A_n x)ᵀ: LTE head n's scale is s, not
    s/N. So MHLoRA is trained on its loss times N (= the sum over heads of per-head losses, each
    head seeing the whole batch); then the gradients, hence (same optimizer) the factors, agree,
    and W_lte(t) == W0 + (s/N) Σ B_n A_n(t).
    """
    for step, (lte, mh) in enumerate(_run_pair(OPTIMIZERS[opt])):
        for l, m in ((lte[0], mh[0]), (lte[2], mh[2])):
            torch.testing.assert_close(l.lora_A, m.A, rtol=1e-9, atol=1e-10, msg=f"A, step {step}")
            torch.testing.assert_close(l.lora_B, m.B, rtol=1e-9, atol=1e-10, msg=f"B, step {step}")
            torch.testing.assert_close(l.bias, m.bias, rtol=1e-9, atol=1e-10, msg=f"bias, step {step}")
            torch.testing.assert_close(l.weight, m.effective_weight(), rtol=1e-9, atol=1e-10,
                                       msg=f"W, step {step}")
    # The comparison was not vacuous: both factors moved and W left W0.
    for l, m in ((lte[0], mh[0]), (lte[2], mh[2])):
        assert l.lora_B.abs().min() > 0
        assert (l.weight - m.W0).abs().max() > 1e-2
    assert not torch.equal(lte[0].lora_A, _toy_pair(3, 2, 6.0)[0][0].lora_A)


def test_without_merging_lte_is_not_multihead_lora():
    """The control: the same run with no merges drifts away from MHLoRA (the test above can fail)."""
    for lte, mh in _run_pair(OPTIMIZERS["adamw"], merge=False):
        pass
    assert (lte[0].lora_B - mh[0].B).abs().max() > 1e-3


# ------------------------------------------------------------------------------- merges
def _train(layer, params, steps=3, heads=1, seed=5):
    """A few AdamW steps of `layer` on random regression data, so that B != 0; returns the opt."""
    opt = torch.optim.AdamW(params, lr=0.05)
    g = torch_generator(seed)
    for _ in range(steps):
        x = torch.randn(4 * heads, layer.in_features, generator=g)
        y = torch.randn(4 * heads, layer.out_features, generator=g)
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
    assert layer.lora_B.abs().max() > 0
    return opt


def _snapshot(opt, params):
    return {id(p): (opt.state[p], {k: v.clone() for k, v in opt.state[p].items()}) for p in params}


def _assert_state_kept(opt, params, snap):
    for p in params:
        obj, values = snap[id(p)]
        assert opt.state[p] is obj
        for k, v in values.items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_one_head_exact_merge_gives_plain_layer(quant):
    layer = LoRALinear(_linear(16, 12, torch_generator(6)), 4, 8.0, variant="exact", quant=quant,
                       generator=torch_generator(7))
    _train(layer, [layer.lora_A, layer.lora_B, layer.bias])
    with torch.no_grad():
        v = layer.corr_B @ layer.corr_A
        w_new = layer.base.dequantize() + layer.scale * (layer.lora_B @ layer.lora_A - v)
        layer.base.set_weight(w_new)  # what the server broadcasts after the merge
    layer.commit_merge()
    x = torch.randn(5, 16, generator=torch_generator(8))
    # The head computes exactly the (possibly quantized) merged plain layer.
    want = F.linear(x, layer.base.dequantize()) + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)
    if quant == "none":
        torch.testing.assert_close(layer(x), F.linear(x, w_new) + layer.bias, rtol=0, atol=1e-6)
    assert torch.equal(layer.corr_A, layer.lora_A) and torch.equal(layer.corr_B, layer.lora_B)


def test_one_head_reset_merge_zeroes_B_keeps_A_and_optimizer():
    layer = LoRALinear(_linear(16, 12, torch_generator(6)), 4, 8.0, variant="reset", quant="none",
                       generator=torch_generator(7))
    params = [layer.lora_A, layer.lora_B, layer.bias]
    opt = _train(layer, params)
    a_before, snap = layer.lora_A.detach().clone(), _snapshot(opt, params)
    with torch.no_grad():
        w_new = layer.base.dequantize() + layer.scale * layer.lora_B @ layer.lora_A
        layer.base.set_weight(w_new)
    layer.commit_merge()
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.lora_A, a_before)
    _assert_state_kept(opt, params, snap)
    assert layer.corr_A is None and not any("corr" in n for n, _ in layer.named_buffers())
    x = torch.randn(5, 16, generator=torch_generator(8))
    torch.testing.assert_close(layer(x), F.linear(x, w_new) + layer.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_stacked_merge_every_head_computes_merged_layer(variant, quant):
    N = 3
    layer = StackedLoRALinear(_linear(16, 12, torch_generator(6)), N, 4, 8.0, variant=variant, quant=quant,
                              generators=[torch_generator(7, n) for n in range(N)])
    params = [layer.lora_A, layer.lora_B, layer.bias]
    opt = _train(layer, params, heads=N)
    a_before, snap = layer.lora_A.detach().clone(), _snapshot(opt, params)
    w_new, b_new = layer.merged_weight(), layer.bias.detach().mean(0)
    layer.merge()
    torch.testing.assert_close(layer.weight, w_new, rtol=0, atol=0)
    x = torch.randn(N * 5, 16, generator=torch_generator(8))  # different inputs per head
    w_fwd = w_new if quant == "none" else layer.base.dequantize()
    torch.testing.assert_close(layer(x), F.linear(x, w_fwd) + b_new, rtol=0, atol=1e-6)
    assert torch.equal(layer.lora_A, a_before)
    _assert_state_kept(opt, [layer.lora_A], snap)
    if variant == "reset":
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        assert layer.corr_A is None and not any("corr" in n for n, _ in layer.named_buffers())
        _assert_state_kept(opt, params, snap)
    else:
        assert torch.equal(layer.corr_B, layer.lora_B) and layer.lora_B.abs().max() > 0
    # A second merge with nothing trained in between changes nothing.
    torch.testing.assert_close(layer.merged_weight(), w_new, rtol=0, atol=1e-6)


# ----------------------------------------------------------------- stacked == separate heads
@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_stacked_equals_separate_one_head_layers(variant, quant):
    N, b, L = 3, 2, 5
    g = torch_generator(10)
    lin = _linear(20, 12, g)
    stacked = StackedLoRALinear(lin, N, 4, 8.0, variant=variant, quant=quant,
                                generators=[torch_generator(11, n) for n in range(N)])
    with torch.no_grad():  # a mid-training state: B, V and biases all non-trivial
        stacked.lora_B.copy_(torch.randn(stacked.lora_B.shape, generator=g) * 0.1)
        stacked.bias.copy_(torch.randn(stacked.bias.shape, generator=g))
        if variant == "exact":
            stacked.corr_A.copy_(torch.randn(stacked.corr_A.shape, generator=g))
            stacked.corr_B.copy_(torch.randn(stacked.corr_B.shape, generator=g) * 0.1)
    heads = []
    for n in range(N):
        h = LoRALinear(lin, 4, 8.0, variant=variant, quant=quant, generator=torch_generator(99))
        with torch.no_grad():
            for name in ("lora_A", "lora_B", "bias", "corr_A", "corr_B"):
                if getattr(h, name) is not None:
                    getattr(h, name).copy_(getattr(stacked, name)[n])
        if quant != "none":
            for k, t in h.base.parts().items():
                assert torch.equal(t, stacked.base.parts()[k]), k
        heads.append(h)

    x = torch.randn(N * b, L, 20, generator=g, requires_grad=True)
    out = stacked(x)
    gout = torch.randn(out.shape, generator=g)
    (out * gout).sum().backward()
    for n, h in enumerate(heads):
        sl = slice(n * b, (n + 1) * b)
        xn = x.detach()[sl].clone().requires_grad_()
        out_n = h(xn)
        (out_n * gout[sl]).sum().backward()
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[sl], out_n, **tol)
        torch.testing.assert_close(xn.grad, x.grad[sl], **tol)
        torch.testing.assert_close(h.lora_A.grad, stacked.lora_A.grad[n], **tol)
        torch.testing.assert_close(h.lora_B.grad, stacked.lora_B.grad[n], **tol)
        torch.testing.assert_close(h.bias.grad, stacked.bias.grad[n], **tol)
    assert stacked.lora_A.grad.abs().max() > 0
