"""The scaling rows of `make bench` (benchmarks/flower_overhead.py `pair`, T=10, default digits
job, run.nodes at its default) for the given N, side by side, as JSON on stdout.

    python scripts/scaling_pairs.py 4 16
    python scripts/scaling_pairs.py --nodes 1 4 16   # Flower on one node stacking all N heads
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.flower_overhead as fo  # noqa: E402

args = sys.argv[1:]
if args[:1] == ["--nodes"]:
    nodes, args = int(args[1]), args[2:]
    plain = fo._spec
    fo._spec = lambda T, steps, heads, engine, out: _with_nodes(plain(T, steps, heads, engine, out), nodes)


def _with_nodes(spec, nodes):
    spec.run.nodes = nodes
    return spec


T_STEPS, pair = fo.T_STEPS, fo.pair
out = []
with tempfile.TemporaryDirectory() as tmp:
    for n in map(int, args):
        r = pair(10, T_STEPS[10], n, tmp)
        print(f"N={n}: fused {r['fused_round_s']['median']:.3f} s/round, flower {r['flower_round_s']['median']:.3f} "
              f"s/round, flower/fused {r['flower_over_fused']:.2f}x", file=sys.stderr, flush=True)
        out.append(r)
print(json.dumps(out, indent=1, default=str))
