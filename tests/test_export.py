"""Export: a trained, merged StackedLTE exports a plain state that loads (strict) into a freshly
built plain model and computes what every head computes."""

import pytest
import torch
import torch.nn.functional as F

from lte_fed import LTEConfig, build_model, parameterize
from lte_fed.rng import torch_generator

MODELS = {
    "vit_digits": dict(img_size=8, in_chans=1),
    "mixer_digits": dict(img_size=8, in_chans=1),
    "tv_vit_digits": dict(img_size=8, in_chans=3),
}


def _train_and_merge(name, cfg, steps=3):
    """A few AdamW steps on random data (every head its own slice), then a merge."""
    lte = parameterize(build_model(name, num_classes=10, seed=0, **MODELS[name]), cfg)
    opt = torch.optim.AdamW(lte.parameters(), lr=0.01)
    g = torch_generator(40)
    shape = (MODELS[name]["in_chans"], MODELS[name]["img_size"], MODELS[name]["img_size"])
    for _ in range(steps):
        x = torch.randn(cfg.heads * 4, *shape, generator=g)
        y = torch.randint(0, 10, (cfg.heads * 4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(lte(x), y).backward()
        opt.step()
    assert all(l.lora_B.abs().max() > 0 for l in lte.lora_layers().values())
    lte.merge()
    return lte.eval(), shape


def _check_export(name, cfg, lte=None):
    lte, shape = lte or _train_and_merge(name, cfg)
    plain = build_model(name, num_classes=10, seed=1, **MODELS[name]).eval()  # different weights
    x = torch.randn(3, *shape, generator=torch_generator(41))
    before = plain(x)
    plain.load_state_dict(lte.export_plain_state(), strict=True)
    want = plain(x)
    assert (want - before).abs().max() > 1e-3  # the load really replaced the weights
    out = lte(x.repeat(cfg.heads, 1, 1, 1))  # every head on the same input
    for n in range(cfg.heads):
        torch.testing.assert_close(out[3 * n:3 * (n + 1)], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["exact", "reset"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_loads_strict_and_matches_heads(name, variant):
    _check_export(name, LTEConfig(heads=2, rank=4, alpha=16.0, variant=variant))


def test_export_with_kept_norm_affine():
    cfg = LTEConfig(heads=2, rank=4, alpha=16.0, keep_norm_affine=True)
    lte, shape = _train_and_merge("vit_digits", cfg)
    state = lte.export_plain_state()
    # the trained norm affines are exported, not the 1/0 a dropped affine would get
    assert (state["blocks.0.norm1.weight"] - 1).abs().max() > 0
    _check_export("vit_digits", cfg, (lte, shape))


def test_export_does_not_change_the_model():
    lte, _ = _train_and_merge("vit_digits", LTEConfig(heads=2, rank=4, alpha=16.0))
    before = {k: v.clone() for k, v in lte.state_dict().items()}
    lte.export_plain_state()
    after = lte.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
