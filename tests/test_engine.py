"""The fused engine: every method's run directory, MHLoRA = LTE(T=1, shared batch), exact resume,
and bad configs rejected before training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lte_fed.engine import FusedRun, run_fused
from lte_fed.models import build_model
from lte_fed.rundir import METRIC_FIELDS, RunDir
from lte_fed.spec import Spec, SpecError, validate

from .helpers import max_abs_diff, model_of, quick_spec


@pytest.mark.parametrize("method", ["lte", "mhlora", "lora", "lora_merge", "full"])
def test_each_method_writes_the_run_directory(tmp_path, method):
    spec = quick_spec(method, quant={"base": "nf4"} if method == "lte" else {})
    summary = run_fused(spec, tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["step"] for r in rows] == [3, 6]
    assert [r["samples"] for r in rows] == [48, 96]  # cumulative batch per step, all heads together
    for r in rows:
        assert set(METRIC_FIELDS) <= set(r)
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) and 0 <= r["test_acc"] <= 100
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    # synchronizations: one per merge; every step for data-parallel full training; none for a
    # head that is never merged
    assert summary["totals"]["sync_steps"] == {"full": 6, "lora": 0, "mhlora": 0}.get(method, 2)
    assert summary["totals"]["samples"] == 96
    assert summary["config"]["resolved"]["heads"] == (1 if method in ("lora", "lora_merge", "full") else 2)
    assert summary["config"]["resolved"]["variant"] == ("reset" if method == "lora_merge" else spec.lte.variant)
    assert summary["config"]["method"] == method and summary["final"]["test_acc"] == rows[-1]["test_acc"]
    assert Spec.from_dict(summary["config"]) == spec  # a run's config reads back as its spec
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert (tmp_path / "checkpoint.safetensors").exists()
    # the exported model is the plain architecture: it loads strictly into a fresh build
    plain = build_model("vit_digits", num_classes=10, img_size=8, in_chans=3, seed=123)
    plain.load_state_dict(model_of(tmp_path), strict=True)


def test_lte_T1_with_a_shared_batch_follows_mhlora(tmp_path):
    """mhlora (paper eq. 2, loss = N x mean loss) and LTE with T=1, exact merges and every head
    fed the same batch end with the same merged weights."""
    common = {"lte": {"heads": 3, "rank": 4, "alpha": 32.0, "merge_every": 1, "variant": "exact"},
              "train": {"batch_size": 8, "steps": 5, "warmup": 1}}
    run_fused(quick_spec("mhlora", **common), tmp_path / "mh")
    lte = quick_spec("lte", **common)
    lte.lte.same_batch = True
    run_fused(lte, tmp_path / "lte")
    a, b = model_of(tmp_path / "mh"), model_of(tmp_path / "lte")
    assert max_abs_diff(a, b) < 2e-5
    assert max_abs_diff(a, model_of_init()) > 1e-3  # and they did train


def model_of_init():
    return build_model("vit_digits", num_classes=10, img_size=8, in_chans=3, seed=0).state_dict()


@pytest.mark.parametrize("method", ["lte", "full"])
def test_resume_continues_exactly(tmp_path, method):
    spec = quick_spec(method, train={"steps": 12})
    run_fused(spec, tmp_path / "whole")
    first = FusedRun(spec, tmp_path / "cut").run(stop_after_rounds=2)
    assert first == {"stopped_at_round": 2}
    assert len(RunDir(tmp_path / "cut").read_metrics()) == 2
    resumed = quick_spec(method, train={"steps": 12}, run={"resume": str(tmp_path / "cut")})
    FusedRun(resumed, tmp_path / "cut").run()
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "cut")) == 0.0
    whole, cut = RunDir(tmp_path / "whole").read_metrics(), RunDir(tmp_path / "cut").read_metrics()
    assert [r["test_acc"] for r in whole] == [r["test_acc"] for r in cut]


def test_resume_refuses_a_different_job(tmp_path):
    FusedRun(quick_spec(train={"steps": 12}), tmp_path).run(stop_after_rounds=1)
    other = quick_spec(train={"steps": 12}, lte={"rank": 8}, run={"resume": str(tmp_path)})
    with pytest.raises(SpecError, match="lte.rank"):
        FusedRun(other, tmp_path / "x").run()


@pytest.mark.parametrize("override, key", [
    ({"lte": {"rank": 0}}, "lte.rank"),
    ({"lte": {"heads": 3}}, "train.batch_size"),  # 16 does not split into 3 heads
    ({"model": {"name": "resnet_imaginary"}}, "model.name"),
    ({"lte": {"variant": "sometimes"}}, "lte.variant"),
    ({"quant": {"base": "int3"}}, "quant.base"),
    ({"data": {"partition": "roundrobin"}}, "data.partition"),
    ({"train": {"warmup": -1}}, "train.warmup"),  # a warm-up longer than the run is fine: cut to it
    ({"method": "adam"}, "method"),
])
def test_bad_config_fails_before_training_naming_the_key(override, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        validate(quick_spec(**override))


def test_unknown_key_is_named():
    from lte_fed.spec import Spec

    with pytest.raises(SpecError, match="lte.ranks"):
        Spec.from_dict({"lte": {"ranks": 4}})


def test_per_head_clip_is_per_head():
    from lte_fed.train import clip_per_head

    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # head 0 norm 5, head 1 norm 0.5
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = g.clone()
    norms = clip_per_head([p], 1.0, heads=2)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert torch.allclose(p.grad[0].norm(), torch.tensor(1.0), atol=1e-5)  # clipped
    assert torch.equal(p.grad[1], g[1])  # untouched


def test_a_gradient_whose_square_overflows_fp32_is_clipped_not_zeroed():
    """Gradients ~1e20 (a huge lte.alpha) square past fp32's range: the norm was inf, the clip
    factor 0, and training stopped without a word while the run reported its loss."""
    from lte_fed.train import clip_per_head

    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([[3e20, 4e20], [0.3, 0.4]])
    norms = clip_per_head([p], 1.0, heads=2)
    assert torch.allclose(norms.double(), torch.tensor([5e20, 0.5], dtype=torch.float64))
    assert torch.allclose(p.grad[0], torch.tensor([0.6, 0.8]))  # clipped to norm 1, not to 0
    assert torch.equal(p.grad[1], torch.tensor([0.3, 0.4]))
