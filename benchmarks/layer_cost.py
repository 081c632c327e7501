"""Section `layers`: one Linear layer's forward + backward, LTE against full training, at the
step benchmark's sizes (ViT-S layers, N heads of L tokens each), timed in this thread's CPU
time on one thread. A whole-model step on a shared machine moves by 15% between runs; one
layer on one thread, round-robin, moves by ~1%, so this is where a change to the LTE layer
is judged before the whole-model ratios of section `step` are read.

Variants per layer shape (m, n): full (nn.Linear, weight gradient included); the stacked
layer, exact (V folded into per-head bases) and reset, each also through the op-by-op
reference (`plain`); one head (what a client runs, per head: time / 1, the stacked ones / N),
fp32 and NF4, with V folded into the transient base per use or (`cached`) once per merge.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

SHAPES = ((1152, 384), (384, 384), (1536, 384), (384, 1536))  # ViT-S qkv, proj, fc1, fc2 (out, in)


def _layers(m: int, n: int, heads: int, rank: int) -> dict:
    from lte_fed.lora import LoRALinear, StackedLoRALinear
    from lte_fed.rng import torch_generator as tg

    lin = nn.Linear(n, m)
    out = {"full": (nn.Linear(n, m), 1)}
    for variant in ("exact", "reset"):
        for impl in ("fast", "plain"):
            layer = StackedLoRALinear(lin, heads, rank, float(rank), variant=variant, quant="none",
                                      generators=[tg(1, h) for h in range(heads)])
            layer.impl = impl
            out[f"stacked_{variant}" + ("_plain" if impl == "plain" else "")] = (layer, heads)
    for quant in ("none", "nf4"):
        for cache in (False, True):
            layer = LoRALinear(lin, rank, float(rank), variant="exact", quant=quant, generator=tg(1, 0))
            layer.cache_base = cache
            out[f"head_{quant}" + ("_cached" if cache else "")] = (layer, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mid-training: B and V non-zero
        for layer, _ in out.values():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(generator=g)
                if layer.corr_A is not None:
                    layer.corr_A.normal_(generator=g)
                    layer.corr_B.normal_(generator=g)
    return out


def main(a) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokens = (a.img // a.patch) ** 2 + 1
    per_head = a.batch // a.heads
    res = {}
    try:
        for m, n in SHAPES:
            layers = _layers(m, n, a.heads, a.rank)
            xs = {k: torch.randn(h * per_head, tokens, n, requires_grad=True) for k, (_, h) in layers.items()}
            gs = {k: torch.randn(h * per_head, tokens, m) for k, (_, h) in layers.items()}
            times = {k: [] for k in layers}
            for rep in range(a.warmup + max(a.reps, 5)):
                for k, (layer, h) in layers.items():
                    t0 = time.thread_time()
                    layer(xs[k]).backward(gs[k])
                    if rep >= a.warmup:
                        times[k].append((time.thread_time() - t0) / h)  # per head
            med = {k: statistics.median(v) for k, v in times.items()}
            res[f"{m}x{n}"] = {"ms_per_head": {k: 1000 * v for k, v in med.items()},
                               "vs_full": {k: v / med["full"] for k, v in med.items()},
                               "vs_stacked_exact": {k: v / med["stacked_exact"] for k, v in med.items()}}
        quantize = quantize_cost(max(a.reps, 5))
    finally:
        torch.set_num_threads(threads)
    return {"config": {"tokens_per_head": per_head * tokens, "heads": a.heads, "rank": a.rank, "threads": 1},
            "layers": res, "quantize": quantize}


def quantize_cost(reps: int) -> dict:
    """Quantizing one layer's W to each 4-bit format, as the server does for every round's
    message (lte_fed.quant.quantize) against bitsandbytes' own quantize_4bit, same bytes
    (tests/test_quant.py); this thread's CPU time, alternating, median ms and ratio."""
    from lte_fed import quant

    bnbf = quant._bnb()
    out = {}
    for fmt in ("nf4", "nf4-dq", "fp4"):
        kind, double = quant.four_bit(fmt)
        for m, n in SHAPES:
            w = torch.randn(m, n)
            ours, theirs = [], []
            for rep in range(reps + 1):
                t0 = time.thread_time()
                quant.quantize(w, fmt)
                t1 = time.thread_time()
                bnbf.quantize_4bit(w, quant_type=kind, blocksize=quant.BLOCKSIZE_4BIT, compress_statistics=double)
                if rep:  # the first is a warm-up
                    ours.append(t1 - t0)
                    theirs.append(time.thread_time() - t1)
            out[f"{fmt} {m}x{n}"] = {"ours_ms": 1000 * statistics.median(ours),
                                     "bitsandbytes_ms": 1000 * statistics.median(theirs),
                                     "ratio": statistics.median(o / t for o, t in zip(ours, theirs))}
    return out
