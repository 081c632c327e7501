"""`make bench`: every benchmark of lte-fed on whatever device is present, results to
benchmarks/results/<date>.md and .json.

    .venv/bin/python -m benchmarks.run                 # everything (~12 min on 2 idle CPU cores)
    .venv/bin/python -m benchmarks.run --quick         # tiny sizes, a smoke test (~2 min)
    .venv/bin/python -m benchmarks.run --sections step,bytes

Sections (each runs in its own subprocess, so memory, threads and Flower's process-wide state
never leak from one into the next): step (step cost), layers (one layer's cost, one thread, CPU
time: the steady measurement a change to the LTE layer is judged by), flower (Flower vs fused per round, split
into parts), bytes (per-round message bytes, DDP volume), deploy (a real loopback deployment
next to the simulation and fused engines: wall time per round and its split, and each client's
peak memory measured in the real ClientApp processes; benchmarks/deployment.py), accuracy (samples to reach full training's accuracy), scaling
(time per round as N grows). Figures are medians of repeated runs with the IQR; ratios are
taken pair by pair within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, environment

SECTIONS = ("step", "layers", "bytes", "flower", "accuracy", "deploy")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="results file stem (default: today's date)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--device", default="auto")
    # section 1
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--variants", default=None, help="section 1: comma-separated subset of the variants (default: all)")
    # child mode
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.img, a.patch, a.batch, a.reps = 16, 8, 8, 3
    unknown = [s for s in a.sections.split(",") if s and s not in SECTIONS]
    if unknown or not a.sections.strip(","):
        ap.error(f"--sections {a.sections!r}: choose from {', '.join(SECTIONS)}")
    if a.name is not None and (not a.name or a.name.startswith(".") or "/" in a.name or os.sep in a.name):
        ap.error(f"--name {a.name!r} is a file stem in --out-dir: no folder, not hidden")
    return a


def child(a) -> int:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    mod = __import__(f"benchmarks.{ {'step': 'step_cost', 'layers': 'layer_cost', 'flower': 'flower_overhead', 'deploy': 'deployment'}.get(a.section, a.section) }",
                     fromlist=["main"])
    t0 = time.perf_counter()
    out = mod.main(a)
    out["section_s"] = time.perf_counter() - t0
    out["env"] = environment()
    a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    if a.section:
        return child(a)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "make bench" if not argv and os.environ.get("MAKELEVEL") else \
        " ".join([".venv/bin/python -m benchmarks.run", *map(shlex.quote, argv)])
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.name or time.strftime("%Y-%m-%d") + ("-quick" if a.quick else "")
    results = {"command": command, "quick": a.quick, "env": environment(), "sections": {}}
    t0 = time.perf_counter()
    for sec in [s for s in a.sections.split(",") if s]:
        path = a.out_dir / f".{stem}.{sec}.json"
        print(f"[bench] {sec} ...", flush=True)
        ts = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.run", *argv, "--section", sec, "--json", str(path)]
        res = subprocess.run(cmd, cwd=ROOT)
        if res.returncode or not path.exists():
            results["sections"][sec] = {"error": f"exit {res.returncode}"}
            print(f"[bench] {sec} FAILED (exit {res.returncode})", flush=True)
            continue
        results["sections"][sec] = json.loads(path.read_text())
        path.unlink()
        print(f"[bench] {sec} done in {time.perf_counter() - ts:.0f} s", flush=True)
    results["total_s"] = time.perf_counter() - t0
    results["env_end"] = environment()
    from .report import markdown

    (a.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (a.out_dir / f"{stem}.md").write_text(markdown(results))
    print(f"[bench] wrote {a.out_dir / stem}.md and .json in {results['total_s']:.0f} s")
    failed = [sec for sec, r in results["sections"].items() if "error" in r]
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
