"""`lte-fed`, the Hydra app, as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

QUICK = ["data.name=synthetic", "data.synthetic_size=256", "lte.heads=2", "lte.rank=4", "lte.merge_every=3",
         "train.batch_size=16", "train.steps=6", "train.warmup=2", "run.progress=false", "run.device=cpu"]


def lte_fed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=_env())


def _env():
    import os

    root = Path(__file__).resolve().parents[1]
    return os.environ | {"PYTHONPATH": str(root), "HYDRA_FULL_ERROR": "0"}


def test_a_fused_run_writes_its_directory_and_prints_the_table(tmp_path):
    out = tmp_path / "run"
    r = lte_fed(*QUICK, "run.engine=fused", f"run.out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| lte (fused, N=2, r=4)" in r.stdout and "test acc" in r.stdout
    assert {"metrics.jsonl", "summary.json", "model.safetensors", "checkpoint.safetensors"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lte"]["heads"] == 2 and summary["totals"]["sync_steps"] == 2


@pytest.mark.parametrize("arg, key", [("lte.rank=0", "lte.rank"), ("train.batch_size=15", "train.batch_size"),
                                      ("model.name=nope", "model.name"), ("data.name=imagefolder", "data.root"),
                                      ("method=fedavg", "run.engine")])
def test_bad_input_ends_in_one_clear_line(tmp_path, arg, key):
    r = lte_fed(*QUICK, "run.engine=fused", arg, f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"lte-fed: error: {key}" in r.stderr, r.stderr[-2000:]


def test_missing_dataset_says_how_to_get_it(tmp_path):
    r = lte_fed(*QUICK, "run.engine=fused", "data.name=cifar10", f"data.root={tmp_path / 'nothing'}",
                f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "lte-fed: error:" in r.stderr and str(tmp_path / "nothing") in r.stderr
