"""The server's outer optimizer (lte.outer): the update rules, avg as its special case, the
exact variant's invariant under it, and exact resume of its state (fused engine)."""

from __future__ import annotations

import pytest
import torch

from lte_fed.engine import FusedRun, run_fused
from lte_fed.lte import LTEConfig, StackedLTE
from lte_fed.models import build_model
from lte_fed.outer import OuterConfig, OuterOptimizer, outer_update

from .helpers import max_abs_diff, model_of, quick_spec


def _deltas(k: int, shape=(5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(k)]


@pytest.mark.parametrize("kind", ["nesterov", "adam"])
def test_outer_rules_are_torchs_optimizers_on_the_negated_update(kind):
    """nesterov = torch.optim.SGD(nesterov=True), adam = torch.optim.Adam, each stepping on the
    pseudo-gradient −Δ."""
    cfg = OuterConfig(kind, lr=0.7, momentum=0.9, beta2=0.95, eps=1e-6)
    p = torch.zeros(5, 7, requires_grad=True)
    ref = (torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True) if kind == "nesterov"
           else torch.optim.Adam([p], lr=0.7, betas=(0.9, 0.95), eps=1e-6))
    w, state = torch.zeros(5, 7), {}
    for d in _deltas(4):
        p.grad = -d
        ref.step()
        step, state = outer_update(d, state, cfg)
        w = w + step
    assert torch.allclose(w, p.detach(), atol=1e-6, rtol=1e-5)


def test_nesterov_with_lr_1_and_no_momentum_is_avg_bit_for_bit(tmp_path):
    outer = OuterOptimizer(OuterConfig("nesterov", lr=1.0, momentum=0.0))
    for d in _deltas(3):
        assert torch.equal(outer.propose("w", d), d)
        mean, anchor = d * 3 + 0.1, d - 0.3
        assert torch.equal(outer.propose_mean("r", mean, anchor), mean)
        outer.commit()
    # and whole runs of the fused engine end with the same bits
    run_fused(quick_spec(train={"steps": 9}), tmp_path / "avg")
    run_fused(quick_spec(train={"steps": 9}, lte={"outer": "nesterov", "outer_lr": 1.0, "outer_momentum": 0.0}),
              tmp_path / "nesterov")
    assert max_abs_diff(model_of(tmp_path / "avg"), model_of(tmp_path / "nesterov")) == 0.0
    run_fused(quick_spec(train={"steps": 9}, lte={"outer": "nesterov"}), tmp_path / "momentum")
    assert max_abs_diff(model_of(tmp_path / "avg"), model_of(tmp_path / "momentum")) > 1e-4  # it does act


@torch.no_grad()
def test_exact_invariant_holds_under_nesterov():
    """Right after a merge through Nesterov (twice, so the momentum is non-zero), every head
    computes W_new x: the stacked model's outputs equal the merged plain model's. In float64, so
    that only a broken invariant (not fp32 rounding of W − sV + sBA) can show."""
    plain = build_model("vit_digits", num_classes=10, img_size=8, in_chans=3, seed=0)
    cfg = LTEConfig(heads=3, rank=4, alpha=32.0, variant="exact", quant="none", seed=0)
    model = StackedLTE(plain, cfg).double()
    outer = OuterOptimizer(OuterConfig("nesterov", lr=0.7, momentum=0.9))
    anchors = model.replica_anchors()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in model.head_params():  # stands in for local training: every head moves its own way
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.merge(outer, anchors)
    assert outer.state  # momentum is there
    merged = build_model("vit_digits", num_classes=10, img_size=8, in_chans=3, seed=0)
    merged.double().load_state_dict(model.export_plain_state())
    x = torch.randn(4, 3, 8, 8, generator=g).double()
    y_heads = model(x.repeat(3, 1, 1, 1)).view(3, 4, -1)
    y_plain = merged(x)
    for n in range(3):
        assert torch.allclose(y_heads[n], y_plain, atol=1e-9), (n, float((y_heads[n] - y_plain).abs().max()))
    assert max_abs_diff(merged.state_dict(), plain.state_dict()) > 1e-3


@pytest.mark.parametrize("outer", ["nesterov", "adam"])
def test_resume_with_outer_state_continues_exactly(tmp_path, outer):
    kw = {"train": {"steps": 12}, "lte": {"outer": outer, "outer_lr": 0.7 if outer == "nesterov" else 1e-3}}
    run_fused(quick_spec(**kw), tmp_path / "whole")
    assert FusedRun(quick_spec(**kw), tmp_path / "cut").run(stop_after_rounds=2) == {"stopped_at_round": 2}
    FusedRun(quick_spec(**kw, run={"resume": str(tmp_path / "cut")}), tmp_path / "cut").run()
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "cut")) == 0.0


@pytest.mark.parametrize("override, key", [({"outer": "sgd"}, "lte.outer"), ({"outer_lr": 0.0}, "lte.outer_lr"),
                                           ({"outer_momentum": 1.0}, "lte.outer_momentum")])
def test_bad_outer_keys_are_named(override, key):
    from lte_fed.spec import SpecError, validate

    with pytest.raises(SpecError, match=key):
        validate(quick_spec(lte=override))
