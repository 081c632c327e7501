"""Configs that used to pass validation and then fail (issue 12, item 4), as a user runs them
through the real `lte-fed` CLI: each now works, or is refused up front with one line naming the
key (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch

from lte_fed.engine import run_fused
from lte_fed.models import build_model
from lte_fed.rundir import RunDir

from .helpers import max_abs_diff, model_of, quick_spec
from .test_cli import QUICK, lte_fed

pytestmark = pytest.mark.timeout(600)


def test_a_short_run_works_under_the_default_warmup(tmp_path):
    """train.steps=6 with the default train.warmup (20): the warm-up is cut to the run."""
    args = [a for a in QUICK if not a.startswith("train.warmup=")]
    r = lte_fed(*args, "run.engine=fused", f"run.out={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [row["step"] for row in rows] == [3, 6] and all(0 < row["lr"] for row in rows)


def test_torchvision_vit_trains_on_one_channel_digits(tmp_path):
    r = lte_fed("model=tv_vit_digits", "train.steps=4", "lte.merge_every=2", "run.engine=fused", "run.progress=false",
                "run.device=cpu", f"run.out={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["resolved"]["in_chans"] == 1 and summary["final"]["test_acc"] is not None
    plain = build_model("tv_vit_digits", num_classes=10, img_size=8, in_chans=1)
    plain.load_state_dict(model_of(tmp_path / "run"))  # strict: the export is the 1-channel model


def test_same_batch_on_flower_trains_every_head_as_the_fused_engine_does(tmp_path):
    """lte.same_batch=true on Flower: every head draws head 0's batch (it used to ask for a shard
    that does not exist, so only head 0 trained), and the result is the fused engine's."""
    from strategies.simulation import run_flower

    run_flower(quick_spec("lte", "flower", lte={"same_batch": True}), tmp_path / "flower")
    assert [row["merged_heads"] for row in RunDir(tmp_path / "flower").read_metrics()] == [2, 2]
    logged = (tmp_path / "flower" / "flower.log").read_text()  # the ServerApp's log
    assert "not merged" not in logged, logged[-3000:]  # no head refused (Ray's own warnings may say "failed")
    run_fused(quick_spec("lte", "fused", lte={"same_batch": True}), tmp_path / "fused")
    assert max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused")) < 1e-4


BAD = [
    ("lte.heads=abc", "lte.heads"),  # a type error: the Spec's check, not OmegaConf's many lines
    ("lte.same_batch=maybe", "lte.same_batch"),
    ("train.warmup=-1", "train.warmup"),
    ("model.patch_size=3", "model.img_size"),  # 8 px digits do not cut into 3 px patches
    ("model.img_size=9", "model.img_size"),  # nor 9 px into vit_digits' default 2 px patches
    ("run.checkpoint_every=0", "run.checkpoint_every"),
    ("train.weight_decay=-1", "train.weight_decay"),
]


@pytest.mark.parametrize("arg, key", BAD + ([("run.device=cuda", "run.device")] if not torch.cuda.is_available() else []))
def test_a_config_no_run_can_use_is_refused_in_one_line(tmp_path, arg, key):
    r = lte_fed(*QUICK, "run.engine=fused", arg, f"run.out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"lte-fed: error: {key}: "), r.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # refused before any training
