"""LTE on Flower's real simulation engine: same weights as the fused engine, faults survived,
a vanished node's head continues, FedAvg baseline, and no process left behind."""

from __future__ import annotations

import json
import math
import os
import re
import uuid

import pytest
import torch

from app.cli import report
from lte_fed.engine import run_fused
from lte_fed.rundir import RunDir
from lte_fed.spec import SpecError
from strategies.simulation import ray_resources, run_flower

from .helpers import TAG, max_abs_diff, model_of, quick_spec, tagged_processes

pytestmark = pytest.mark.timeout(600)


# With a 4-bit base, one merge is compared: the next q(W) re-quantizes W, and a float-rounding
# difference between the engines' W (1e-7) can move an entry across a code boundary, i.e. by a
# whole 4-bit step. Over several merges the engines are compared with the base in fp32.
@pytest.mark.parametrize("base, steps", [("none", 6), ("nf4", 3), ("nf4-dq", 3)])
def test_flower_and_fused_end_with_the_same_weights(tmp_path, monkeypatch, base, steps):
    spec = quick_spec("lte", "flower", quant={"base": base}, train={"steps": steps})
    monkeypatch.setenv(TAG, tag := uuid.uuid4().hex)
    summary = run_flower(spec, tmp_path / "flower")
    assert tagged_processes(tag) == [], "the run left processes behind"
    fused = run_fused(quick_spec("lte", "fused", quant={"base": base}, train={"steps": steps}), tmp_path / "fused")
    diff = max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused"))
    assert diff < 1e-4, diff
    assert summary["params"] == fused["params"] and summary["params"]["lora"] > 0  # was {} for Flower runs
    rows = RunDir(tmp_path / "flower").read_metrics()
    assert [r["merged_heads"] for r in rows] == [2] * (steps // 3)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"] for r in rows)  # q(W) down, factors up
    assert summary["totals"]["sync_steps"] == steps // 3


# The outer optimizer and the compressed uplink (with its error feedback on the workers) give the
# same weights on both engines; the uplink's bytes are the real replies' and shrink as they should.
# (adam is left out here: its step is ~lr·sign(Δ) wherever Δ is tiny, so 1e-7 differences between
# the engines' training become lr-sized; tests/test_outer.py checks it against torch.optim.Adam.)
@pytest.mark.parametrize("outer, up", [("nesterov", "int8"), ("avg", "fp16")])
def test_engines_agree_with_an_outer_optimizer_and_a_compressed_uplink(tmp_path, outer, up):
    groups = {"train": {"steps": 9}, "comm": {"up": up},
              "lte": {"outer": outer, "outer_lr": 0.7 if outer == "nesterov" else 1e-3}}
    run_flower(quick_spec("lte", "flower", **groups), tmp_path / "flower")
    run_fused(quick_spec("lte", "fused", **groups), tmp_path / "fused")
    diff = max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused"))
    # int8: a 1e-7 difference between the engines can round one entry to the next int8 step (the
    # error feedback takes it back a round later), so the engines agree to a step, not to 1e-7
    assert diff < (5e-4 if up == "int8" else 1e-4), diff
    rows = RunDir(tmp_path / "flower").read_metrics()
    assert [r["merged_heads"] for r in rows] == [2, 2, 2]
    fused_up = RunDir(tmp_path / "fused").read_metrics()[0]["bytes_up"]  # tensor bytes only
    assert fused_up < rows[0]["bytes_up"] < fused_up * 1.5  # Flower's framing on top of the same arrays


# nodes=None: run.nodes at its default, with a fraction of a CPU per node (Flower's federation
# config takes whole CPUs; strategies/simulation.py ray_resources) so that this machine's cores
# run 8 nodes at once; and the node of partition 7 a slow device (it answers late, no deadline:
# the same weights).
@pytest.mark.parametrize("nodes", [2, 8, None])
def test_eight_heads_on_any_number_of_nodes_end_with_the_fused_engines_weights(tmp_path, nodes):
    run = {"nodes": nodes} if nodes else {"client_cpus": (os.cpu_count() or 1) / 8, "fault": "slow2:node7:*"}
    spec = quick_spec("lte", "flower", lte={"heads": 8}, run=run)
    nodes = nodes or 8
    run_flower(spec, tmp_path / "flower")
    run_fused(quick_spec("lte", "fused", lte={"heads": 8}), tmp_path / "fused")
    diff = max_abs_diff(model_of(tmp_path / "flower"), model_of(tmp_path / "fused"))
    assert diff < 1e-4, diff
    rows = RunDir(tmp_path / "flower").read_metrics()
    assert [r["merged_heads"] for r in rows] == [8, 8]
    per_node = 8 // nodes
    want = [{"node": n, "heads": list(range(n * per_node, (n + 1) * per_node)), "ranks": [4] * per_node,
             "steps": 3} for n in range(nodes)]
    assert all(r["placement"] == want for r in rows)
    if "fault" in run:  # it slept twice its training time, every round
        late = re.findall(r"node of partition 7 answers ([0-9.]+) s late", (tmp_path / "flower" / "flower.log").read_text())
        assert len(late) == 2 and all(float(s) > 0 for s in late), late


def test_a_cpu_fraction_becomes_whole_cpus_on_a_ray_that_counts_more():
    cores = os.cpu_count() or 1
    assert ray_resources(quick_spec("lte", "flower", run={"client_cpus": 2})) == (2, None)
    assert ray_resources(quick_spec("lte", "flower", run={"client_cpus": 0.5})) == (1, 2 * cores)
    with pytest.raises(SpecError, match="client_cpus"):
        ray_resources(quick_spec("lte", "flower", run={"client_cpus": 1.5}))


# nan / shape: all three heads on one node, the bad one is refused alone; raise fails a whole
# node, so there every head has its own.
@pytest.mark.parametrize("fault, reason, nodes", [("nan:1:2", "non-finite", 1), ("shape:0:1", "has shape", 1),
                                                  ("raise:2:1", "failed", 3)])
def test_a_bad_client_is_rejected_and_the_others_merge(tmp_path, fault, reason, nodes):
    spec = quick_spec("lte", "flower", lte={"heads": 3, "merge_every": 2}, train={"batch_size": 12},
                      run={"fault": fault, "nodes": nodes})
    run_flower(spec, tmp_path)
    kind, head, rnd = fault.split(":")
    rows = RunDir(tmp_path).read_metrics()
    merged = [r["merged_heads"] for r in rows]
    assert merged[int(rnd) - 1] == 2 and merged.count(3) == len(rows) - 1
    logged = (tmp_path / "flower.log").read_text()  # the ServerApp's log, as `flwr run` streamed it
    assert f"head {head}" in logged and reason in logged
    assert [r["merged"] for r in rows][int(rnd) - 1] == sorted({0, 1, 2} - {int(head)})
    # the end of the run says which head missed a merge, in the log and in summary.json
    assert f"head {head} was merged in {len(rows) - 1} of {len(rows)} rounds" in logged
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["merges_per_head"] == [len(rows) - (h == int(head)) for h in range(3)]
    warnings = [line for line in report(summary, tmp_path).splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: head {head} was merged in {len(rows) - 1} of {len(rows)} rounds "
                        f"(why: {tmp_path / 'flower.log'})"]  # on the terminal, under the results
    state = model_of(tmp_path)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_head_whose_node_is_gone_for_a_round_continues(tmp_path):
    spec = quick_spec("lte", "flower", lte={"heads": 2, "merge_every": 2}, train={"steps": 8},
                      run={"fault": "hang:1:2", "round_timeout": 40.0})  # round 1 includes start-up
    run_flower(spec, tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["merged_heads"] for r in rows] == [2, 1, 2, 2]
    logged = (tmp_path / "flower.log").read_text()  # the ServerApp's log, as `flwr run` streamed it
    assert "head 1 (node" in logged and "not merged: no reply" in logged and "head 1 goes to node" in logged
    assert all(math.isfinite(r["test_loss"]) for r in rows)


def test_a_node_past_the_deadline_gets_no_new_message_until_it_answers(tmp_path):
    """Head 1's node hangs in round 2 (for round_timeout + 3 s): the deadline merges head 0
    alone, and while the node is still busy its head trains on the free node (from the server's
    state) instead of queueing behind the hung message."""
    spec = quick_spec("lte", "flower", lte={"heads": 2, "merge_every": 2}, train={"steps": 10},
                      run={"fault": "hang:1:2", "nodes": 2, "round_deadline": 5.0, "round_timeout": 30.0})
    run_flower(spec, tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert [r["merged_heads"] for r in rows] == [2, 1, 2, 2, 2]
    assert rows[0]["placement"] == [{"node": 0, "heads": [0], "ranks": [4], "steps": 2},
                                    {"node": 1, "heads": [1], "ranks": [4], "steps": 2}]
    # round 3 starts ~5 s into a hang of 33 s: node 1 is busy, node 0 takes both heads
    assert rows[2]["placement"] == [{"node": 0, "heads": [0, 1], "ranks": [4, 4], "steps": 2}]
    logged = (tmp_path / "flower.log").read_text()
    assert "round 3: head 1 goes to node" in logged
    assert all(math.isfinite(r["test_loss"]) for r in rows)


def test_fedavg_baseline_runs_through_flowers_fedavg(tmp_path):
    summary = run_flower(quick_spec("fedavg", "flower"), tmp_path)
    rows = RunDir(tmp_path).read_metrics()
    assert len(rows) == 2 and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert summary["config"]["method"] == "fedavg" and summary["config"]["run"]["nodes"] == 2  # was 0
    assert [r["merged"] for r in rows] == [[0, 1]] * 2 and summary["merges_per_head"] == [2, 2]
    assert "warning" not in report(summary, tmp_path)
    assert summary["params"]["trainable"] == sum(t.numel() for t in model_of(tmp_path).values())
    # FedAvg moves the whole model both ways; LTE (quant none) moves the base down, factors up
    assert rows[-1]["bytes_up"] > 0.5 * rows[-1]["bytes_down"]
