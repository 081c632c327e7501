"""The per-device memory estimator and the `lte-fed-memory` CLI (the heavy probe is not run)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lte_fed.lte import LTEConfig
from lte_fed.memory import analyse, base_bytes, estimate_full, estimate_lte, largest_fitting

CFG = LTEConfig(heads=4, rank=64, alpha=4096.0, quant="nf4")


@pytest.fixture(scope="module")
def vit_base():
    return analyse("vit_base", 224)


def test_shape_matches_lte_plan(vit_base):
    # 12 blocks x (qkv, proj, fc1, fc2) + patch embedding + classifier
    assert len(vit_base.linears) == 50
    assert vit_base.tokens == 50 and vit_base.width == 768 and vit_base.depth == 12
    assert vit_base.full_params == pytest.approx(87.5e6, rel=0.01)


def test_lte_client_below_full(vit_base):
    lte, full = estimate_lte(vit_base, CFG, 32), estimate_full(vit_base, 32)
    assert lte["total"] < full["total"]
    # parameter-bound part is several times smaller: the paper's ~1/3, better with nf4
    static = lambda e: e["base"] + e["trainable"] + e["grads"] + e["optimizer"]  # noqa: E731
    assert static(lte) * 3 < static(full)


def test_nf4_base_is_an_eighth_plus_absmax(vit_base):
    m, n = 3072, 768
    assert base_bytes(m, n, "nf4") == m * n // 2 + 4 * (m * n // 64)
    assert base_bytes(m, n, "fp4") == base_bytes(m, n, "nf4")
    assert base_bytes(m, n, "int8") == m * n + 4 * m
    assert base_bytes(m, n, "none") == 4 * m * n
    elems = sum(a * b for a, b in vit_base.linears)
    nf4 = sum(base_bytes(a, b, "nf4") for a, b in vit_base.linears)
    exact = sum(math.ceil(a * b / 2) + 4 * math.ceil(a * b / 64) for a, b in vit_base.linears)
    assert nf4 == exact
    assert nf4 == pytest.approx(4 * elems / 8 * (1 + 1 / 8), rel=1e-3)  # 0.5 B + 4/64 B per elem


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq", "fp4-dq", "int8", "none"])
@pytest.mark.parametrize("shape", [(96, 80), (1536, 384), (33, 7)])  # 120 / 9216 / 3.6 blocks
def test_base_bytes_match_real_quantized_tensors(fmt, shape):
    from lte_fed.quant import QuantizedWeight, quantize

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for parts in (QuantizedWeight(shape, fmt).parts(), quantize(w, fmt)):
        assert sum(t.numel() * t.element_size() for t in parts.values()) == base_bytes(*shape, fmt)


def test_double_quantization_saves_three_of_every_four_absmax_bytes():
    m, n = 3072, 768
    saved = base_bytes(m, n, "nf4") - base_bytes(m, n, "nf4-dq")
    assert saved == 3 * (m * n // 64) - 4 * math.ceil(m * n / 64 / 256) - 4


def test_peak_is_the_model_plus_the_larger_of_training_and_building(vit_base):
    for e in (estimate_lte(vit_base, CFG, 2), estimate_lte(vit_base, CFG, 32), estimate_full(vit_base, 2),
              estimate_full(vit_base, 64)):
        train = e["optimizer"] + e["workspace"] + max(e["grads"], e["activations"])
        assert e["total"] == e["base"] + e["trainable"] + max(train, 2 * e["message"])
    assert estimate_lte(vit_base, CFG, 2)["message"] > 0 == estimate_full(vit_base, 2)["message"]


def test_client_independent_of_heads(vit_base):
    ests = [estimate_lte(vit_base, LTEConfig(heads=h, rank=64, quant="nf4"), 32) for h in (1, 4, 64, 1024)]
    assert all(e == ests[0] for e in ests)


def test_largest_fitting_monotone():
    order = [None, "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"]
    prev = {"lte": 0, "full": 0}
    for gb in (0.05, 0.5, 1, 2, 4, 8, 16, 32, 64):
        best = largest_fitting("vit", int(gb * 2**30), CFG, 32)
        for side in ("lte", "full"):
            rank = order.index(best[side])
            assert rank >= prev[side]
            prev[side] = rank
        assert order.index(best["lte"]) >= order.index(best["full"])
    assert prev == {"lte": 5, "full": 5}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "app.memory", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_table():
    r = _cli("--model", "vit_base", "--rank", "64", "--quant", "nf4", "--batch", "32", "--img-size", "224",
             "--device-gb", "8")
    assert r.returncode == 0, r.stderr
    for word in ("LTE client", "full AdamW", "base / weights", "AdamW state", "activations", "total",
                 "largest vit model"):
        assert word in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope"], "unknown model"),
    (["--batch", "0"], "--batch"),
    (["--device-gb", "-1"], "--device-gb"),
    (["--device-gb", "inf"], "--device-gb"),
    (["--device-gb", "nan"], "--device-gb"),
    (["--quant", "q3"], "quant"),
    (["--rank", "abc"], "invalid int"),
    (["--model", "gpt_tiny", "--img-size", "32"], "--img-size means nothing for 'gpt_tiny', a language model"),
    (["--model", "vit_base", "--vocab", "50257"], "--vocab means nothing for 'vit_base', an image model"),
    (["--model", "gpt_tiny", "--block-size", "0"], "--block-size"),
    (["--classes", "0"], "--classes"),
    # the ladder's sizes past the registered ones are timm's class, built directly: it rounded down
    (["--model", "vit_large", "--img-size", "225"], "not divisible by the patch size"),
    (["--model", "vit_huge", "--patch-size", "3"], "not divisible by the patch size"),
    (["--patch-size", "0"], "--patch-size"),
    (["--model", "mixer_tiny", "--img-size", "8"], "not divisible by the patch size"),
])
def test_cli_bad_input_exits_2(args, needle, capsys):
    from app.memory import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_bad_input_subprocess():
    r = _cli("--model", "nope")
    assert r.returncode == 2
    assert "unknown model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("variant", ["exact", "reset"])
def test_fp32_client_workspace_is_its_kept_folds(vit_base, variant):
    """An fp32-base exact client keeps W - s·V for every Linear within fold_max_bytes (the fp32
    base once more), else one transient of the largest; reset has nothing to fold. Within the
    budget both also fold each step's s·B A where that is the cheaper matmul: at 8 × 50 tokens,
    ViT-B's 768×768 projections and its classifier only."""
    import dataclasses

    from lte_fed.lora import fold_is_cheaper

    elems = [m * n for m, n in vit_base.linears]
    step = [m * n for m, n in vit_base.linears if fold_is_cheaper(8 * vit_base.tokens, m, n)]
    assert set(step) == {768 * 768, 100 * 768} and len(step) < len(elems)
    cfg = dataclasses.replace(CFG, quant="none", variant=variant)
    kept = estimate_lte(vit_base, cfg, 8)["workspace"]
    per_use = estimate_lte(vit_base, dataclasses.replace(cfg, fold_max_bytes=0), 8)["workspace"]
    if variant == "exact":
        assert kept == 4 * sum(elems) + 4 * sum(step) and per_use == 4 * max(elems)
    else:
        assert kept == 4 * sum(step) and per_use == 0
    assert estimate_lte(vit_base, CFG, 8)["workspace"] == 4 * max(elems)  # nf4: a transient, always


def test_cli_takes_the_patch_size(capsys):
    from app.memory import main

    assert main(["--model", "mixer_tiny", "--img-size", "8", "--patch-size", "4"]) == 0
    assert "4 tokens" in capsys.readouterr().out


def test_a_language_model_is_estimated_with_its_logits_and_a_text_job_with_its_own_vocabulary(tmp_path):
    """`memory-gb` nodes on a language-model run: the server's estimate raised "needs text data"
    (it built the model as an image model), and the ServerApp died."""
    from lte_fed.job import setup
    from lte_fed.lte import LTEConfig
    from lte_fed.memory import activation_bytes, estimate_lte, heads_that_fit, job_shape

    from .test_language import text_spec, write_corpus

    shape = analyse("gpt_tiny", 64, 65)
    assert (shape.tokens, shape.vocab) == (64, 65)
    wide = analyse("gpt_tiny", 64, 50257)
    assert activation_bytes(wide, 2) - activation_bytes(shape, 2) == 2 * 64 * (50257 - 65) * 2 * 4  # 2 floats each
    job = setup(text_spec(write_corpus(tmp_path / "text")))
    shape = job_shape(job)
    assert (shape.tokens, shape.vocab) == (16, job.data.vocab_size)
    cfg = LTEConfig(heads=2, rank=4, quant="nf4")
    one = estimate_lte(shape, cfg, 8)["total"]
    assert heads_that_fit(shape, cfg, 8, one) == 1 and heads_that_fit(shape, cfg, 8, one / 2) == 0
    r = _cli("--model", "gpt_tiny", "--vocab", "65", "--block-size", "64")
    assert r.returncode == 0 and "gpt_tiny:" in r.stdout and "64 tokens" in r.stdout and "vocabulary 65" in r.stdout
