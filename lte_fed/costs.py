"""What one worker message cost: where its wall time went and its process's peak memory.

A worker reports these in its reply's metrics (the keys of COST_KEYS); the server logs them per
head and writes their worst value over the round's heads to metrics.jsonl (`round_costs`):
the slowest and the largest worker are what bound a round and a device.

    start_s    process start -> the handler runs (interpreter, Flower's own set-up, imports);
               0 when the process already served a message (simulation's long-lived actors)
    imports_s  the ClientApp module's own imports (part of start_s; 0 like it)
    libs_s     the libraries this job loads lazily (the model's: timm imports torchvision);
               0 once a process has them
    data_s     the shard: read from the node's cache or prepared from the dataset
    model_s    skeleton, LoRA surgery, filling it from the message and the saved state
    train_s    the T local steps
    reply_s    saving the worker's state and packing the reply
    rss_peak_mib   the process's peak resident memory (VmHWM), MiB
    rss_entry_mib  the same peak as the handler started: what the process reached before the
                   job's own work (interpreter, imports, Flower pulling and inflating the message)
    cuda_peak_mib  torch.cuda.max_memory_allocated, MiB (0 without CUDA)
    full_weights   full-precision W-shaped (m, n) tensors created while the model was built
                   (lte_fed/worker.FullWeightWatch; -1 where it is not watched)
"""

from __future__ import annotations

import functools
import os
import sys
import time

COST_KEYS = ("start_s", "imports_s", "libs_s", "data_s", "model_s", "train_s", "reply_s", "rss_peak_mib",
             "rss_entry_mib", "cuda_peak_mib", "full_weights")
TIME_KEYS = COST_KEYS[:7]


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0.0 where that cannot be read)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: peak resident set; VmRSS: now); 0 if unknown."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory and (if torch already uses CUDA) its CUDA peak, MiB."""
    cuda = 0.0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.max_memory_allocated() / 2**20
    return {"rss_peak_mib": round(status_kib("VmHWM") / 1024, 1), "cuda_peak_mib": round(cuda, 1)}


def pin_mmap_threshold(nbytes: int) -> bool:
    """Have glibc's malloc serve every block of `nbytes` or more with its own mmap, returned to
    the system when freed; False where the C library is not glibc.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), so
    after the first step a training process serves its per-use dequantized tiles from the heap,
    interleaved with activations, and the holes they leave keep it growing: measured on a ViT-B
    NF4 head (lora layers' tiles up to 9.4 MiB), the peak rose ~280 MiB from step 0 to step 1 and
    stayed there. Pinned at 8 MiB, the largest tiles never enter the heap: peak 1,386 against
    1,557 MiB, step time +1.6%. Lower thresholds save a little more (128 KiB: 1,269 MiB) at a
    cost of 17-50% in page faults (docs/performance.md §4)."""
    libc = _glibc()
    M_MMAP_THRESHOLD = -3  # malloc.h
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what a training step frees for the next step; False where the C
    library is not glibc. For a process with memory to spare (the fused engine on CPU).

    By default glibc returns the top of the heap to the system once more than its trim threshold
    is free there, which happens at the end of every backward pass (the activations go), and
    maps blocks over its moving mmap threshold afresh: the next step faults all those pages in
    again. Measured on the ViT-S step (benchmarks/step_cost.py, one thread): ~156,000 page faults
    per full-training step and ~45,000 per LTE step, 5-8% of the step's CPU time; with the heap
    kept (trim threshold 2 GiB) and blocks up to 32 MiB (glibc's ceiling) served from it, about
    none. The cost: the process's resident memory stays at its peak between steps."""
    libc = _glibc()
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return libc is not None and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and \
        bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20))


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc `malloc_trim`); False where the C
    library is not glibc. A worker calls it between training and its reply: the step's
    activations leave the heap full of freed small blocks, while the reply's packed arrays
    (larger than the mmap threshold) are mapped afresh, on top of them, and set the process's
    peak (measured on a ViT-B NF4 head: +80-100 MiB over the training peak)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _glibc():
    """This process's glibc (ctypes), or None: looked up once, not on every message."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


class Stopwatch:
    """Laps of wall time by name: `with watch("data"): ...` adds to data_s."""

    def __init__(self):
        self.laps: dict[str, float] = {}

    def __call__(self, name: str):
        return _Lap(self, name)


class _Lap:
    def __init__(self, watch: Stopwatch, name: str):
        self.watch, self.name = watch, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        key = f"{self.name}_s"
        self.watch.laps[key] = self.watch.laps.get(key, 0.0) + time.perf_counter() - self.t0


def message_wall_s(m: dict) -> float:
    """One message's wall time in the worker from its cost metrics: its laps and, for a process's
    first message, the start before the handler (the imports are inside that start)."""
    return sum(float(m.get(k, 0.0)) for k in TIME_KEYS if k != "imports_s")


def round_costs(per_head: dict[int, dict]) -> dict[str, float]:
    """The round's row: for every cost key any head reported, its largest value over the heads
    (`client_<key>`), plus the process overhead of the slowest worker — its wall time outside
    training (`client_overhead_s`)."""
    out: dict[str, float] = {}
    for key in COST_KEYS:
        vals = [float(m[key]) for m in per_head.values() if isinstance(m.get(key), (int, float))]
        if vals:
            out[f"client_{key}"] = round(max(vals), 3)
    if per_head:
        slowest = max(per_head.values(), key=message_wall_s)
        out["client_overhead_s"] = round(message_wall_s(slowest) - float(slowest.get("train_s", 0.0)), 3)
    return out


def costs_line(rnd: int, head, m: dict) -> str:
    """One message's costs for the server log: `head` an id, or the list of a node's heads."""
    t = " ".join(f"{k[:-2]} {float(m[k]):.2f}" for k in TIME_KEYS if k in m)
    heads = list(head) if isinstance(head, (list, tuple)) else [head]
    who = f"head {heads[0]}" if len(heads) == 1 else f"heads {','.join(map(str, heads))}"
    return (f"round {rnd}: {who} cost {t} s; peak RSS {float(m.get('rss_peak_mib', 0)):.0f} MiB"
            + (f" ({float(m['rss_entry_mib']):.0f} before the job's work)" if "rss_entry_mib" in m else "")
            + (f", CUDA {float(m['cuda_peak_mib']):.0f} MiB" if m.get("cuda_peak_mib") else ""))
