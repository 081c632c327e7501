"""The scaling rows of `make bench` (benchmarks/flower_overhead.py `pair`, T=10, default digits
job, run.nodes at its default) for the given N, side by side, as JSON on stdout.

    python scripts/scaling_pairs.py 4 16
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flower_overhead import T_STEPS, pair  # noqa: E402

out = []
with tempfile.TemporaryDirectory() as tmp:
    for n in map(int, sys.argv[1:]):
        r = pair(10, T_STEPS[10], n, tmp)
        print(f"N={n}: fused {r['fused_round_s']['median']:.3f} s/round, flower {r['flower_round_s']['median']:.3f} "
              f"s/round, flower/fused {r['flower_over_fused']:.2f}x", file=sys.stderr, flush=True)
        out.append(r)
print(json.dumps(out, indent=1, default=str))
