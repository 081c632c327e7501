"""LTE on Flower's real simulation engine: same weights as the fused engine, faults survived,
a vanished node's head continues, exact resume, FedAvg baseline, and no process left behind."""

from __future__ import annotations

import logging
import math
import subprocess

import pytest
import torch

from lte_fed.engine import run_fused
from lte_fed.rundir import RunDir
from strategies.simulation import run_flower

from .helpers import max_abs_diff, model_of, quick_spec

pytestmark = pytest.mark.timeout(600)


def ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    # an exited process awaiting its parent's reaping (<defunct>) holds nothing and runs nothing
    return [line for line in out.splitlines() if "pgrep" not in line and "<defunct>" not in line]


def test_flower_and_fused_end_with_the_same_weights(tmp_path):
    spec = quick_spec("lte", "flower", quant={"base": "nf4"})
    before = ray_processes()
    summary = run_flower(spec, tmp_path / "flower")
    assert ray_processes() == before, "the simulation left Ray processes behind"
    run_fused(quick_spec("lte", "fused", quant={"base": "nf4"}), tmp_path / "fused")
    diff = max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused"))
    assert diff < 1e-4, diff
    rows = RunDir(tmp_path / "flower").read_metrics()
    assert [r["merged_heads"] for r in rows] == [2, 2]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"] for r in rows)  # q(W) down, factors up
    assert summary["totals"]["sync_steps"] == 2


@pytest.mark.parametrize("fault, reason", [("nan:1:2", "non-finite"), ("shape:0:1", "has shape"),
                                           ("raise:2:1", "failed")])
def test_a_bad_client_is_rejected_and_the_others_merge(tmp_path, caplog, fault, reason):
    spec = quick_spec("lte", "flower", lte={"heads": 3, "merge_every": 2}, train={"batch_size": 12},
                      run={"fault": fault})
    caplog.set_level(logging.INFO, logger="lte_fed.server")
    run_flower(spec, tmp_path)
    kind, head, rnd = fault.split(":")
    rows = RunDir(tmp_path).read_metrics()
    merged = [r["merged_heads"] for r in rows]
    assert merged[int(rnd) - 1] == 2 and merged.count(3) == len(rows) - 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"head {head}" in logged and reason in logged
    state = model_of(tmp_path)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_head_whose_node_is_gone_for_a_round_continues(tmp_path, caplog):
    spec = quick_spec("lte", "flower", lte={"heads": 2, "merge_every": 2}, train={"steps": 8},
                      run={"fault": "hang:1:2", "round_timeout": 40.0})  # round 1 includes start-up
    caplog.set_level(logging.INFO, logger="lte_fed.server")
    run_flower(spec, tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["merged_heads"] for r in rows] == [2, 1, 2, 2]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "no reply from node" in logged and "head 1 goes to node" in logged
    assert all(math.isfinite(r["test_loss"]) for r in rows)


def test_a_stopped_flower_run_resumes_where_it_would_have_ended(tmp_path):
    spec = quick_spec("lte", "flower", train={"steps": 9})
    run_flower(spec, tmp_path / "whole")
    assert run_flower(spec, tmp_path / "cut", stop_after_rounds=2) == {"stopped_at_round": 2}
    resumed = quick_spec("lte", "flower", train={"steps": 9}, run={"resume": str(tmp_path / "cut")})
    run_flower(resumed, tmp_path / "cut")
    assert len(RunDir(tmp_path / "cut").read_metrics()) == 3
    assert max_abs_diff(model_of(tmp_path / "whole"), model_of(tmp_path / "cut")) < 1e-6


def test_fedavg_baseline_runs_through_flowers_fedavg(tmp_path):
    summary = run_flower(quick_spec("fedavg", "flower"), tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert len(rows) == 2 and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert summary["config"]["method"] == "fedavg"
    # FedAvg moves the whole model both ways; LTE (quant none) moves the base down, factors up
    assert rows[-1]["bytes_up"] > 0.5 * rows[-1]["bytes_down"]
