"""Section 1: time per training step of the fused engine vs full training, N one-head models
stepped in turn, and the floor (base frozen, no LoRA, input gradients only), same model and
cumulative batch. Every variant is stepped once per repetition, round-robin, so the ratios pair
measurements taken seconds apart (what matters on a shared machine)."""

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

    def __init__(self, lte_run):
        from lte_fed.job import lte_config
        from lte_fed.lte import HeadLTE
        from lte_fed.train import make_optimizer

        s, job = lte_run.spec, lte_run.job
        self.spec, self.job, self.src = s, job, lte_run.src
        self.models = [HeadLTE(job.plain, lte_config(s), n).to(job.device) for n in range(s.heads)]
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


def build(a, tmp: str) -> dict:
    from lte_fed.engine import FusedRun

    runs = {
        "full": FusedRun(_spec(a, "full"), f"{tmp}/full"),
        "lte": FusedRun(_spec(a, "lte"), f"{tmp}/lte"),
        "lte_reset": FusedRun(_spec(a, "lte", variant="reset"), f"{tmp}/lte_reset"),
        "lte_nf4": FusedRun(_spec(a, "lte", "nf4"), f"{tmp}/lte_nf4"),
    }
    # Before the fused engine cached q(W) dequantized (lte_fed/lora.py): every forward and every
    # input gradient dequantized again, as a memory-bound worker still does. Same values.
    runs["lte_nf4_ondemand"] = FusedRun(_spec(a, "lte", "nf4"), f"{tmp}/lte_nf4_ondemand")
    for layer in runs["lte_nf4_ondemand"].model.lora_layers().values():
        layer.base_linear = layer.base.linear
    runs["separate"] = _Separate(runs["lte"])
    runs["floor"] = _Floor(FusedRun(_spec(a, "full"), f"{tmp}/floor"))
    return runs


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
        for _ in range(a.reps):
            for k, r in runs.items():
                with Timer() as t:
                    r.train_step()
                    sync(device)
                times[k].append(t.s)
        prof = {k: profile(runs[k], device) for k in ("lte", "full")} if a.profile else {}
    out = {"config": {"model": a.model, "img_size": a.img, "patch_size": a.patch, "tokens": (a.img // a.patch) ** 2 + 1,
                      "heads": a.heads, "rank": a.rank, "alpha": float(a.rank), "batch": a.batch, "reps": a.reps,
                      "device": str(device)},
           "step_s": {k: stats(v) for k, v in times.items()}, "raw_s": times,
           "ratios": {
               "lte/full": ratio_stats(times["lte"], times["full"]),
               "lte/floor": ratio_stats(times["lte"], times["floor"]),
               "lte_reset/floor": ratio_stats(times["lte_reset"], times["floor"]),
               "lte_reset/full": ratio_stats(times["lte_reset"], times["full"]),
               "lte_nf4/full": ratio_stats(times["lte_nf4"], times["full"]),
               "lte_nf4_ondemand/full": ratio_stats(times["lte_nf4_ondemand"], times["full"]),
               "lte_nf4/lte_nf4_ondemand": ratio_stats(times["lte_nf4"], times["lte_nf4_ondemand"]),
               "separate/lte": ratio_stats(times["separate"], times["lte"]),
               "floor/full": ratio_stats(times["floor"], times["full"]),
           },
           "profile": prof, "flops": linear_flops(a)}
    return out


def linear_flops(a) -> dict:
    """Matmul FLOPs per token of the model's Linears, relative to the floor (forward + input
    gradient of the base). full adds the weight gradient; LoRA adds r(m+n) per matmul: forward,
    input grad and the factors' grads (3), and the exact correction's forward and input grad (2)."""
    from lte_fed.memory import analyse

    lin = analyse(a.model, a.img, 10, a.patch).linears
    base = sum(m * n for m, n in lin)
    lora = sum(a.rank * (m + n) for m, n in lin)
    floor = 2 * base
    return {"full": 3 * base / floor, "lte_reset": (2 * base + 3 * lora) / floor,
            "lte (exact)": (2 * base + 5 * lora) / floor}
