"""Section 1: time per training step of the fused engine vs full training, N one-head models
stepped in turn, and the floor (base frozen, no LoRA, input gradients only), same model and
cumulative batch. Every variant is stepped once per repetition, round-robin, so the ratios pair
measurements taken seconds apart (what matters on a shared machine).

The `*_plain` variants run the same models through the op-by-op reference of the LTE layer
(`lte_fed.lora.lte_linear_plain`, what the engine ran before the fast path), so each speed-up
is measured side by side with what it replaces."""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F

from .common import Timer, ratio_stats, spec_dict, stats, sync


def _spec(a, method: str, quant: str = "none", variant: str = "exact"):
    from lte_fed.spec import Spec

    return Spec.from_dict(spec_dict(
        method, model={"name": a.model, "img_size": a.img, "patch_size": a.patch},
        data={"name": "synthetic", "synthetic_size": max(64, 2 * a.batch)},
        lte={"heads": a.heads, "rank": a.rank, "alpha": float(a.rank), "merge_every": 10**6, "variant": variant},
        train={"batch_size": a.batch, "steps": 10**6, "warmup": 1}, quant=quant, device=a.device))


class _Separate:
    """N one-head models (HeadLTE, what Flower clients train) stepped one after another."""

    def __init__(self, lte_run, cache_base: bool = False, **cfg):
        import dataclasses

        from lte_fed.job import lte_config
        from lte_fed.lte import HeadLTE
        from lte_fed.train import make_optimizer

        s, job = lte_run.spec, lte_run.job
        self.spec, self.job, self.src = s, job, lte_run.src
        lcfg = dataclasses.replace(lte_config(s), **cfg)  # e.g. fold_max_bytes=0
        self.models = [HeadLTE(job.plain, lcfg, n).to(job.device) for n in range(s.heads)]
        if cache_base:  # opt-in (a quantized base): q(W) kept dequantized (and V folded) per layer
            for m in self.models:
                for layer in m.lora_layers().values():
                    layer.cache_base = True
        self.opts = [make_optimizer([p for p in m.parameters() if p.requires_grad], s.lr, 0.0) for m in self.models]
        self.step = 0

    def train_step(self):
        from lte_fed.train import train_head

        for n, (m, o) in enumerate(zip(self.models, self.opts)):
            train_head(m, o, self.src, n, self.step, 1, lr=lambda _: self.spec.lr, clip=self.spec.train.clip,
                       device=self.job.device, precision=self.spec.run.precision)
        self.step += 1


class _Floor:
    """The plain model, every weight frozen, no LoRA: forward + backward of input gradients
    only (the least any method that back-propagates through the model can cost)."""

    def __init__(self, full_run):
        self.run = full_run
        self.model = copy.deepcopy(full_run.job.plain).to(full_run.job.device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train_step(self):
        from lte_fed.train import autocast

        x, y = self.run._batch()
        x.requires_grad_(True)
        with autocast(self.run.job.device, self.run.spec.run.precision):
            loss = F.cross_entropy(self.model(x).float(), y)
        loss.backward()
        self.run.step += 1


WHAT = {
    "full": "plain model, AdamW on every weight (method=full, fused engine)",
    "lte": "fused LTE, exact variant (default), fp32 base, V folded into per-head bases",
    "lte_plain": "as lte, through the op-by-op reference layer (V applied to the tokens)",
    "lte_reset": "fused LTE, reset variant (no correction term)",
    "lte_reset_plain": "as lte_reset, through the op-by-op reference layer",
    "lte_nf4": "fused LTE, exact, NF4 base (dequantized and folded once per merge)",
    "separate": "N one-head HeadLTE models (what Flower clients run), fp32 base, stepped in turn "
                "(W - s·V kept per layer: 4·m·n bytes, within fold_max_bytes)",
    "separate_percall": "as separate with fold_max_bytes=0: W - s·V folded into a transient per use, nothing m×n kept",
    "separate_nf4": "N one-head models, NF4 base dequantized (and V folded) per use: the memory-bound client",
    "separate_nf4_cached": "as separate_nf4 with the opt-in cache (q(W) dequantized and folded once per merge, 4·m·n bytes per layer)",
    "floor": "plain model, all weights frozen, no LoRA: forward + input gradients only",
}


def build(a, tmp: str) -> dict:
    from lte_fed.engine import FusedRun
    from lte_fed.lora import set_impl

    def lte(name, quant="none", variant="exact", impl="fast"):
        run = FusedRun(_spec(a, "lte", quant, variant), f"{tmp}/{name}")
        set_impl(run.model, impl)
        return run

    want = set(a.variants.split(",")) if getattr(a, "variants", None) else set(WHAT)
    if want - set(WHAT) or "full" not in want:
        raise SystemExit(f"--variants {a.variants!r}: every ratio is to 'full', which must be listed; "
                         f"choose from {', '.join(WHAT)}")
    make = {
        "full": lambda: FusedRun(_spec(a, "full"), f"{tmp}/full"),
        "lte": lambda: lte("lte"),
        "lte_plain": lambda: lte("lte_plain", impl="plain"),
        "lte_reset": lambda: lte("lte_reset", variant="reset"),
        "lte_reset_plain": lambda: lte("lte_reset_plain", variant="reset", impl="plain"),
        "lte_nf4": lambda: lte("lte_nf4", "nf4"),
        "separate": lambda: _Separate(lte("separate")),
        "separate_percall": lambda: _Separate(lte("separate_percall"), fold_max_bytes=0),
        "separate_nf4": lambda: _Separate(lte("separate_nf4", "nf4")),
        "separate_nf4_cached": lambda: _Separate(lte("separate_nf4_cached", "nf4"), cache_base=True),
        "floor": lambda: _Floor(FusedRun(_spec(a, "full"), f"{tmp}/floor")),
    }
    return {k: f() for k, f in make.items() if k in want}


# ratio -> target of the issue it answers (None: reported, no target)
RATIOS = {
    "lte/full": 1.06, "lte_reset/full": 0.92, "lte_nf4/full": 1.10, "separate/lte": 1.10,
    "separate_percall/lte": None, "separate/separate_percall": None,
    "separate_nf4/lte_nf4": None, "separate_nf4_cached/lte_nf4": None,
    "lte/lte_plain": None, "lte_reset/lte_reset_plain": None, "lte_plain/full": None,
    "lte/lte_reset": None, "lte/floor": None, "floor/full": None,
}


def profile(run, device, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=acts) as p:
        run.train_step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(p.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in rows) or 1
    return [{"op": e.key, "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total, "calls": e.count}
            for e in rows[:top]]


def main(a) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        runs = build(a, tmp)
        device = runs["full"].job.device
        for r in runs.values():  # warm-up (optimizer state, allocator, oneDNN primitives)
            for _ in range(a.warmup):
                r.train_step()
        sync(device)
        times = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        for _ in range(a.reps):
            for k, r in runs.items():
                with Timer() as t:
                    r.train_step()
                    sync(device)
                times[k].append(t.s)
                cpu[k].append(t.cpu)
        prof = {k: profile(runs[k], device) for k in ("lte", "full") if k in runs} if a.profile else {}
    out = {"config": {"model": a.model, "img_size": a.img, "patch_size": a.patch, "tokens": (a.img // a.patch) ** 2 + 1,
                      "heads": a.heads, "rank": a.rank, "alpha": float(a.rank), "batch": a.batch, "reps": a.reps,
                      "device": str(device)},
           "step_s": {k: stats(v) for k, v in times.items()}, "raw_s": times,
           "ratios": _ratios(times), "cpu_ratios": _ratios(cpu) if device.type == "cpu" else {}, "raw_cpu_s": cpu,
           "targets": {k: t for k, t in RATIOS.items() if t is not None}, "what": WHAT,
           "profile": prof, "flops": linear_flops(a)}
    return out


def _ratios(times: dict) -> dict:
    return {k: ratio_stats(times[num], times[den]) for k in RATIOS
            for num, den in [k.split("/")] if num in times and den in times}


def linear_flops(a) -> dict:
    """Matmul FLOPs per token of the model's Linears, relative to full training (forward, input
    gradient and weight gradient of the base: 3 m·n). The floor drops the weight gradient; LoRA
    adds r(m+n) per matmul: forward, input grad and the factors' grads (3); the exact
    correction V applied to the tokens adds its forward and input grad (2), folded into
    per-head bases it adds nothing per token (N·m·n·r once per merge)."""
    from lte_fed.memory import analyse

    from lte_fed.lora import fold_is_cheaper

    shape = analyse(a.model, a.img, 10, a.patch)
    lin, tokens = shape.linears, a.batch // a.heads * shape.tokens  # tokens per head
    base = sum(m * n for m, n in lin)
    lora = sum(a.rank * (m + n) for m, n in lin)
    # s·B A folded into the step's per-head bases where cheaper (lora._LTEFoldedLinear): the
    # forward's (A x)·sBᵀ and the backward's gh·A, r(m+n) per token, become m·n·r per head
    step_fold = sum(a.rank * m * n / tokens if fold_is_cheaper(tokens, m, n) else a.rank * (m + n) for m, n in lin)
    full = 3 * base
    return {"floor": 2 * base / full, "lte_reset": (2 * base + 3 * lora) / full,
            "lte (exact, V folded)": (2 * base + 3 * lora) / full,
            "lte (exact, V on the tokens)": (2 * base + 5 * lora) / full,
            "lte or lte_reset, s·B A folded for the step (the fused engine's default)": (2 * base + 2 * lora + step_fold) / full}
