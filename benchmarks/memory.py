"""Section 4: peak memory of one client, LTE (nf4 base + one head) vs full-model AdamW, for
ViT-S and ViT-B at 224 px, measured by benchmarks/memory_probe.py (each side in a fresh
process) next to lte_fed.memory's estimate."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROBE = Path(__file__).resolve().parent / "memory_probe.py"


def main(a) -> dict:
    models = ("vit_small",) if a.quick else ("vit_small", "vit_base")
    img, batch = (64, 4) if a.quick else (224, 8)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            path = Path(tmp) / f"{m}.json"
            cmd = [sys.executable, str(PROBE), "--model", m, "--img-size", str(img), "--batch", str(batch),
                   "--steps", "2", "--rank", "64", "--quant", "nf4", "--threads", str(torch.get_num_threads()),
                   "--out", str(path)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                out[m] = {"error": res.stderr[-2000:]}
                continue
            out[m] = json.loads(path.read_text()) | {"command": " ".join(cmd[1:]), "stdout": res.stdout}
    return out
