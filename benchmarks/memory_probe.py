"""Measure the peak memory of one LTE client vs full-model AdamW training, next to the estimate.

    .venv/bin/python benchmarks/memory_probe.py --out /tmp/mem.json    # ~3 min on 2 CPU cores

Each side runs in its own fresh subprocess, measured the same way:

1. import everything (torch, timm, bitsandbytes, lte_fed) and warm up with one tiny training
   step, so thread pools, oneDNN and allocator arenas exist; gc + malloc_trim; the RSS now is
   the BASELINE — interpreter and libraries, which no estimate of a model should contain.
2. build the model to train: the plain model for full training; for LTE the plain model,
   then `parameterize_head` (nf4 base, one head), then the plain model is deleted. gc +
   malloc_trim. RSS - baseline is the STATIC memory (weights/base + head + nothing else).
3. reset the peak: on CPU by writing "5" to /proc/self/clear_refs (Linux resets VmHWM to the
   current RSS); on CUDA torch.cuda.reset_peak_memory_stats(). This drops the transient
   full-precision copies that building HeadLTE makes (deep copy + quantize) — a real client
   receives q(W) from the server and never holds them.
4. train `--steps` AdamW steps on random data (the AdamW state appears in step 1, so step 2 is
   already the steady state). PEAK = VmHWM - baseline (CPU) or max_memory_allocated - baseline (CUDA).

glibc is told to serve every allocation >= 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave RSS at once and RSS tracks live tensors instead of heap fragmentation.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MiB = 2**20


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages to the OS
    except OSError:
        pass


def _train(model, params, steps: int, batch: int, img: int, device: str) -> list[float]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x = torch.randn(batch, 3, img, img, generator=gen).to(device)
        y = torch.randint(0, 100, (batch,), generator=gen).to(device)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def child(args) -> dict:
    """One measurement (runs in its own process): see the module docstring for the steps."""
    import torch

    from lte_fed.lte import LTEConfig, parameterize_head
    from lte_fed.models import build_model
    from lte_fed.quant import quantize

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dev = "cuda" if cuda else "cpu"
    tiny = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(dev)
    quantize(torch.randn(64, 64), "nf4")  # same libraries loaded on both sides
    import timm.models.vision_transformer  # noqa: F401  (imported lazily by the builders: ~50 MB)
    opt = torch.optim.AdamW(tiny.parameters())
    tiny(torch.randn(8, 64, device=dev)).sum().backward()
    opt.step()
    del tiny, opt
    _settle()
    base = torch.cuda.memory_allocated() if cuda else _status("VmRSS")

    t0 = time.perf_counter()
    model = build_model(args.model, num_classes=100, img_size=args.img_size, in_chans=3, seed=0)
    if args.child == "lte":
        cfg = LTEConfig(heads=args.heads, rank=args.rank, alpha=float(4 * args.rank), quant=args.quant)
        head = parameterize_head(model, cfg, 0)
        del model
        model = head
    model = model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    build_s = time.perf_counter() - t0
    _settle()
    if cuda:
        static = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    else:
        static = _status("VmRSS") - base
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    times = _train(model, params, args.steps, args.batch, args.img_size, dev)
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    return {"mode": args.child, "device": dev, "baseline_bytes": base, "static_bytes": static,
            "peak_bytes": peak, "build_s": build_s, "step_s": times,
            "trainable": sum(p.numel() for p in params)}


def estimates(args) -> dict:
    from lte_fed.lte import LTEConfig
    from lte_fed.memory import analyse, estimate_full, estimate_lte

    shape = analyse(args.model, args.img_size)
    cfg = LTEConfig(heads=args.heads, rank=args.rank, quant=args.quant)
    return {"lte": estimate_lte(shape, cfg, args.batch), "full": estimate_full(shape, args.batch)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", choices=("lte", "full"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    measured = {}
    for mode in ("lte", "full"):
        cmd = [sys.executable, __file__, "--child", mode, *(sys.argv[1:] if argv is None else argv)]
        cmd += ["--device", args.device]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            sys.stderr.write(res.stderr)
            return res.returncode
        measured[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    est = estimates(args)

    print(f"{args.model} img {args.img_size} batch {args.batch} rank {args.rank} {args.quant}, "
          f"{args.steps} steps on {args.device}  (MiB above a warmed-up baseline)")
    print(f"{'':14}{'static meas':>12}{'static est':>12}{'peak meas':>12}{'peak est':>12}{'est/meas':>10}")
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "child")}}
    for mode in ("lte", "full"):
        m, e = measured[mode], est[mode]
        e_static = e["base"] + e["trainable"]
        ratio = e["total"] / m["peak_bytes"]
        print(f"{mode:14}{m['static_bytes'] / MiB:12.0f}{e_static / MiB:12.0f}"
              f"{m['peak_bytes'] / MiB:12.0f}{e['total'] / MiB:12.0f}{ratio:10.3f}")
        result[mode] = {"measured": m, "estimate": e, "estimate_static_bytes": e_static, "ratio_total": ratio}
    result["lte_over_full_measured"] = measured["lte"]["peak_bytes"] / measured["full"]["peak_bytes"]
    print(f"LTE client / full training peak (measured): {result['lte_over_full_measured']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
