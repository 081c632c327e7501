"""Model surgery and LTE parameterization: accounting, conversions, errors, stacked == one-head,
and deterministic, distinct, orthogonal A."""

import copy
import math

import pytest
import torch
from torch import nn

from lte_fed import LTEConfig, ParameterizeError, accounting, build_model, parameterize, parameterize_head
from lte_fed.convert import PatchifyLinear, SelfAttention, prepare
from lte_fed.lora import LoRALinear, init_lora_A
from lte_fed.rng import torch_generator

MODELS = {  # name -> build kwargs (small images so everything runs on CPU in seconds)
    "vit_digits": dict(img_size=8, in_chans=1),
    "vit_tiny": dict(img_size=32, in_chans=3),
    "mixer_digits": dict(img_size=8, in_chans=1),
    "tv_vit_digits": dict(img_size=8, in_chans=3),
}
CFG = LTEConfig(heads=2, rank=4, alpha=16.0)


def _build(name, seed=0):
    return build_model(name, num_classes=10, seed=seed, **MODELS[name])


# ------------------------------------------------------------------------------ accounting
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_trainable_parameter_is_lora_or_replica(name):
    plain = _build(name)
    n_plain = sum(p.numel() for p in plain.parameters())
    for lte in (parameterize(plain, CFG), parameterize_head(plain, CFG, head=1)):
        counts = accounting(lte)
        assert counts["unaccounted"] == 0 and counts["lora"] > 0 and counts["replica"] > 0, counts
        lora = {id(p) for l in lte.lora_layers().values() for p in (l.lora_A, l.lora_B)}
        for pname, p in lte.named_parameters():
            assert p.requires_grad, pname  # nothing frozen silently
            assert id(p) in lora or getattr(p, "_lte_replica", False), pname
        assert not any(isinstance(m, nn.MultiheadAttention) for m in lte.modules())
    # The one-head model holds the plain model exactly once: base + one replica copy + the
    # norm affines it dropped.
    removed = sum(math.prod(shape) for shape, _ in lte.plan.record.removed_affine.values())
    assert counts["base"] + counts["replica"] + removed == n_plain
    assert sum(p.numel() for p in plain.parameters()) == n_plain  # the input model is untouched


def test_torchvision_attention_is_converted():
    lte = parameterize_head(_build("tv_vit_digits"), CFG, head=0)
    attn = [m for m in lte.modules() if isinstance(m, SelfAttention)]
    assert len(attn) == 4  # one per encoder layer, each with LoRA on in_proj and out_proj
    assert all(isinstance(a.in_proj, LoRALinear) and isinstance(a.out_proj, LoRALinear) for a in attn)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_multihead_attention(batch_first):
    g = torch_generator(20)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():  # non-zero biases so every term is checked
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(3, 7, 16, generator=g)
    want = mha(x, x, x, need_weights=False)[0]
    got = SelfAttention(mha).eval()(x, x, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prepared_torchvision_vit_computes_the_same_function():
    plain = _build("tv_vit_digits").eval()
    prepared = copy.deepcopy(plain)
    prepare(prepared)  # patchify + SelfAttention; the dropped norm affines are 1 and 0 at init
    x = torch.randn(2, 3, 8, 8, generator=torch_generator(21))
    torch.testing.assert_close(prepared(x), plain(x), rtol=1e-5, atol=1e-5)


def test_patchify_linear_matches_conv():
    g = torch_generator(22)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 16, 12, generator=g)
    torch.testing.assert_close(PatchifyLinear(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("channels", [8, 1])  # one output channel: a (1, 3, 3, 3) weight is no token
def test_unsupported_parameter_fails_loudly_by_name(channels):
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.Flatten(), nn.Linear(channels * 4 * 4, 10))
    with pytest.raises(ParameterizeError, match=r"'0\.weight'"):
        parameterize(model, CFG)
    with pytest.raises(ParameterizeError, match=r"'0\.weight'"):
        parameterize_head(model, CFG, head=0)


class _Counter(nn.Module):
    """A layer with state its forward updates, the way BatchNorm's running statistics are."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("scratch", torch.zeros(()), persistent=False)  # not state: allowed

    def forward(self, x):
        self.seen += x.shape[0]
        return x


@pytest.mark.parametrize("norm, owner", [
    (nn.BatchNorm1d(16), "BatchNorm1d"),
    (nn.BatchNorm1d(16, track_running_stats=False), "BatchNorm1d"),  # batch statistics mix the heads
    (_Counter(), "_Counter"),
])
def test_a_layer_whose_state_nothing_merges_is_refused_by_module_name(norm, owner):
    """BatchNorm's running statistics (any persistent buffer) would be trained per head, never
    merged and left out of the export: refused when the model is built, before any training."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), norm, nn.GELU(), nn.Linear(16, 10))
    for build in (lambda: parameterize(model, CFG), lambda: parameterize_head(model, CFG, head=1)):
        with pytest.raises(ParameterizeError, match=rf"^module '2' \({owner}"):
            build()


def test_a_non_persistent_buffer_is_fine():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Scaled(), nn.Linear(16, 10))
    assert parameterize(model, CFG)(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("in_chans", [1, 2, 3])
def test_torchvision_vit_takes_the_datas_channels(in_chans):
    """torchvision hard-codes 3 input channels; the builder gives it the data's count."""
    model = build_model("tv_vit_digits", num_classes=10, img_size=8, in_chans=in_chans)
    assert model.conv_proj.weight.shape == (64, in_chans, 2, 2)
    x = torch.randn(4, in_chans, 8, 8)
    lte = parameterize(model, CFG)
    assert lte(torch.cat([x, x])).shape == (8, 10)
    fresh = build_model("tv_vit_digits", num_classes=10, img_size=8, in_chans=in_chans, seed=1)
    fresh.load_state_dict(lte.export_plain_state())  # strict: the export fits the plain model


@pytest.mark.parametrize("kwargs, key", [
    (dict(rank=0), "lte.rank"),
    (dict(heads=0), "lte.heads"),
    (dict(variant="sometimes"), "lte.variant"),
    (dict(init="zeros"), "lte.init"),
    (dict(quant="nf3"), "quant.base"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LTEConfig(**kwargs)


def test_bad_layer_arguments_name_the_key():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="lte.rank"):
        LoRALinear(lin, 0, 1.0, quant="none", generator=torch_generator(0))
    with pytest.raises(ValueError, match="lte.init"):
        LoRALinear(lin, 2, 1.0, init="zeros", quant="none", generator=torch_generator(0))
    with pytest.raises(ValueError, match="quant.base"):
        LoRALinear(lin, 2, 1.0, quant="int3", generator=torch_generator(0))


# ------------------------------------------------------------------- stacked == one head
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_stacked_head_n_equals_one_head_model(quant):
    cfg = LTEConfig(heads=3, rank=4, alpha=16.0, quant=quant)
    plain = _build("vit_digits")
    stacked = parameterize(plain, cfg).eval()
    g = torch_generator(23)
    with torch.no_grad():  # mid-training: B, V and every replica differ per head
        for l in stacked.lora_layers().values():
            l.lora_B.copy_(torch.randn(l.lora_B.shape, generator=g) * 0.05)
            l.corr_A.copy_(torch.randn(l.corr_A.shape, generator=g) * 0.5)
            l.corr_B.copy_(torch.randn(l.corr_B.shape, generator=g) * 0.05)
        for p in stacked.replica_params().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    b = 2
    x = torch.randn(cfg.heads * b, 1, 8, 8, generator=g)
    out = stacked(x)
    for n in range(cfg.heads):
        head = parameterize_head(plain, cfg, head=n).eval()
        # Same seed, same head: A is already head n's before anything is copied.
        for name, l in head.lora_layers().items():
            assert torch.equal(l.lora_A, stacked.lora_layers()[name].lora_A[n]), name
        head.load_head_state(stacked.head_state(n, with_corr=True))
        torch.testing.assert_close(head(x[n * b:(n + 1) * b]), out[n * b:(n + 1) * b], rtol=1e-4, atol=1e-5)
    # Control: the last head with head 0's state does not reproduce its slice.
    head.load_head_state(stacked.head_state(0, with_corr=True))
    assert (head(x[-b:]) - out[-b:]).abs().max() > 1e-3


# -------------------------------------------------------------------------------- init / A
def test_same_seed_same_A_different_heads_and_seeds_different_A():
    plain = _build("mixer_digits")
    a1 = {n: l.lora_A.detach() for n, l in parameterize(plain, CFG).lora_layers().items()}
    a2 = {n: l.lora_A.detach() for n, l in parameterize(plain, CFG).lora_layers().items()}
    a3 = {n: l.lora_A.detach() for n, l in parameterize(plain, LTEConfig(heads=2, rank=4, alpha=16.0, seed=1))
          .lora_layers().items()}
    assert a1.keys() == a2.keys()
    for n in a1:
        assert torch.equal(a1[n], a2[n]), n
        assert not torch.allclose(a1[n][0], a1[n][1]), n  # head 0 vs head 1
        assert not torch.allclose(a1[n], a3[n]), n  # seed 0 vs seed 1


@pytest.mark.parametrize("rank, fan_in", [(4, 64), (16, 48), (8, 8), (32, 16)])
def test_orthogonal_init_preserves_norm(rank, fan_in):
    a = init_lora_A(rank, fan_in, "orthogonal", torch_generator(24))
    assert a.shape == (rank, fan_in)
    if rank <= fan_in:  # orthonormal rows up to the scale sqrt(fan_in / rank)
        torch.testing.assert_close(a @ a.T, torch.eye(rank) * fan_in / rank, rtol=0, atol=1e-4)
    else:  # orthonormal columns: ||A x|| == ||x|| exactly
        torch.testing.assert_close(a.T @ a, torch.eye(fan_in), rtol=0, atol=1e-5)
    x = torch.randn(4096, fan_in, generator=torch_generator(25))
    ratio = (x @ a.T).norm(dim=1).mean() / x.norm(dim=1).mean()
    assert abs(float(ratio) - 1) < 0.1, float(ratio)


def test_init_draws_only_from_its_generator():
    a = init_lora_A(4, 32, "kaiming", torch_generator(26))
    torch.manual_seed(123)  # the global RNG plays no part
    b = init_lora_A(4, 32, "kaiming", torch_generator(26))
    assert torch.equal(a, b) and a.abs().max() <= 1 / math.sqrt(32)
