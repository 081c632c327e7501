"""Sections 2 and 6: wall time per round of run.engine=flower vs run.engine=fused on the
default digits job (scaled down in steps), at T = 1, 10, 50 and for N = 2, 4, 8, 16 heads at
a fixed cumulative batch; and the Flower round split into its parts, each timed by calling
the same functions the round calls (strategy's quantize / message building / merge, the
client's base loading and local training, message serialization, the server's evaluation).

Per-round times come from the run's own metrics rows (`wall_s`, which both engines advance by
the round's time excluding the evaluation); round 1 is left out (it builds the data and models
inside Flower's workers). Repeats are the remaining rounds.
"""

from __future__ import annotations

import copy
import tempfile

import torch

from .common import Timer, default_spec_dict, stats

T_STEPS = {1: 6, 10: 80, 50: 150}  # T -> train.steps (rounds = steps / T: 6, 8, 3)
QUICK_T_STEPS = {1: 3, 10: 20}


def _spec(T: int, steps: int, heads: int, engine: str, out: str):
    from lte_fed.spec import Spec

    return Spec.from_dict(default_spec_dict([
        f"run.engine={engine}", "run.progress=false", f"lte.merge_every={T}", f"train.steps={steps}",
        f"lte.heads={heads}", f"run.out={out}", "train.warmup=1"]))


def _round_times(out: str) -> list[float]:
    from lte_fed.rundir import RunDir

    walls = [r["wall_s"] for r in RunDir(out).read_metrics()]
    return [b - a for a, b in zip(walls, walls[1:])]  # rounds 2.. (round 1 warms up)


def _bytes_per_client(out: str, heads: int) -> dict:
    from lte_fed.rundir import RunDir

    rows = RunDir(out).read_metrics()
    return {"up": rows[-1]["bytes_up"] / heads, "down": rows[-1]["bytes_down"] / heads}


def pair(T: int, steps: int, heads: int, tmp: str) -> dict:
    from lte_fed.engine import run_fused
    from strategies.simulation import run_flower

    tag = f"T{T}-N{heads}"
    with Timer() as tf:
        run_fused(_spec(T, steps, heads, "fused", f"{tmp}/fused-{tag}"), f"{tmp}/fused-{tag}")
    with Timer() as tw:
        run_flower(_spec(T, steps, heads, "flower", f"{tmp}/flower-{tag}"), f"{tmp}/flower-{tag}")
    fused, flower = _round_times(f"{tmp}/fused-{tag}"), _round_times(f"{tmp}/flower-{tag}")
    fm, wm = stats(fused)["median"], stats(flower)["median"]
    return {"T": T, "heads": heads, "steps": steps, "fused_round_s": stats(fused), "flower_round_s": stats(flower),
            "fused_raw": fused, "flower_raw": flower, "overhead_s": wm - fm, "overhead_ratio": (wm - fm) / fm,
            "flower_over_fused": wm / fm, "fused_run_s": tf.s, "flower_run_s": tw.s,
            "flower_bytes_per_client": _bytes_per_client(f"{tmp}/flower-{tag}", heads)}


def parts(T: int, heads: int, tmp: str, reps: int) -> dict:
    """One Flower round's pieces, timed in this process with the functions the round runs: the
    strategy's message building, one node's loading and stacked local training of its share of
    the heads, serialization, the merge, the server's evaluation."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lte_fed import protocol as P
    from lte_fed.job import batch_source, lte_config, setup
    from lte_fed.lte import StackedLTE
    from lte_fed.node import train_heads
    from lte_fed.placement import NodeInfo
    from lte_fed.train import evaluate, lr_at, make_optimizer
    from strategies.grid_utils import message_bytes
    from strategies.lte_strategy import LTEStrategy
    from strategies.simulation import simulation_nodes

    from .bytes import _fake_grid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    spec = _spec(T, T * (reps + 1), heads, "flower", f"{tmp}/parts")
    job = setup(spec)
    src = batch_source(job)
    st = LTEStrategy(spec, job, f"{tmp}/parts")
    st.eval_model = copy.deepcopy(job.plain)
    workers = simulation_nodes(spec)
    nodes = [100 + n for n in range(workers)]
    for n, node in enumerate(nodes):
        st.partitions.add(NodeInfo(node, n))
    grid = _fake_grid(nodes)
    k = -(-heads // workers)  # the busiest node's heads
    model = StackedLTE(job.plain, lte_config(spec), list(range(k)))
    opt = make_optimizer(model.head_params(), spec.lr, 0.0)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    threads = torch.get_num_threads()
    t = {k: [] for k in ("quantize", "configure", "serialize_down", "client_load", "client_train", "serialize_up",
                         "merge", "evaluate")}
    for rnd in range(1, reps + 2):
        with Timer() as x:
            st.quantized_base()
        t["quantize"].append(x.s)
        with Timer() as x:
            msgs = list(st.configure_train(rnd, None, ConfigRecord(), grid))  # quantize + records + bytes of all nodes
        t["configure"].append(x.s)
        with Timer() as x:
            message_bytes(msgs[0])
        t["serialize_down"].append(x.s)
        with Timer() as x:
            model.load_base_state(P.unpack_wire(msgs[0].content[P.BASE].to_torch_state_dict()))
            model.load_replicas(P.unpack_wire(msgs[0].content[P.REPLICAS].to_torch_state_dict()))
        t["client_load"].append(x.s)
        torch.set_num_threads(max(1, int(spec.run.client_cpus)))  # what one Ray worker gets
        with Timer() as x:
            train_heads(model, opt, src, (rnd - 1) * T, T, lr=lr, clip=spec.train.clip, device=job.device)
        torch.set_num_threads(threads)
        t["client_train"].append(x.s)
        records = {}
        for i in range(k):
            records[P.head_record(i)] = ArrayRecord(P.wire(model.head_state(i)))
            records[P.metrics_record(i)] = MetricRecord({"head": i, "train_loss": 1.0})
        reply = Message(RecordDict(records), reply_to=msgs[0])
        with Timer() as x:
            message_bytes(reply)
        t["serialize_up"].append(x.s)
        good = {h: {n: v.clone() for n, v in model.head_state(h % k).items()} for h in range(heads)}
        with Timer() as x:
            st._round._merged(good)
        t["merge"].append(x.s)
        with Timer() as x:
            st.eval_model.load_state_dict(st.plain_state())
            evaluate(st.eval_model, job.data, job.img_size, job.device, spec.train.eval_batch)
        t["evaluate"].append(x.s)
    t = {k: v[1:] for k, v in t.items()}  # round 1 warms up
    med = {k: stats(v)["median"] for k, v in t.items()}
    predicted = (med["configure"] + med["client_load"] + med["client_train"] + workers * med["serialize_up"]
                 + med["merge"])
    return {"T": T, "heads": heads, "parts_s": {k: stats(v) for k, v in t.items()}, "workers": workers,
            "heads_per_node": k, "predicted_round_s": predicted}


def floor(nodes: int, tmp: str, rounds: int = 8, arrays: int = 1, values: int = 1) -> dict:
    """Flower's own round trip on this machine: the no-op app in benchmarks/flower_floor (one
    message to each of `nodes` simulated nodes, each replying at once with `arrays` float32 arrays
    of `values` values), through the same launcher, SuperLink and polling as a run. What no
    change of ours can take off a Flower round. Round 1 (Ray's workers start) is left out."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from .common import ROOT

    out = Path(tmp) / f"floor-{nodes}-{arrays}x{values}.json"
    config = f"nodes={nodes} rounds={rounds} arrays={arrays} values={values} out='{out}'"
    subprocess.run([sys.executable, "-m", "strategies.launcher", "--app", str(ROOT / "benchmarks" / "flower_floor"),
                    "--nodes", str(nodes), "--run-config", config, "--log", str(Path(tmp) / "floor.log")],
                   cwd=ROOT, check=True)
    if not out.exists():
        raise RuntimeError(f"the floor app wrote no times (see {Path(tmp) / 'floor.log'})")
    times = json.loads(out.read_text())[1:]
    return {"nodes": nodes, "arrays": arrays, "values": values, "round_s": stats(times), "raw": times}


def main(a) -> dict:
    tsteps = QUICK_T_STEPS if a.quick else T_STEPS
    Ns = (2, 4) if a.quick else (2, 4, 8, 16)
    out = {"t_sweep": [], "n_sweep": [], "parts": []}
    with tempfile.TemporaryDirectory() as tmp:
        for T, steps in tsteps.items():
            out["t_sweep"].append(pair(T, steps, 4, tmp))
            out["parts"].append(parts(T, 4, tmp, reps=2 if a.quick else 3))
        for N in Ns:
            hit = next((r for r in out["t_sweep"] if r["T"] == 10 and r["heads"] == N), None)
            out["n_sweep"].append(hit or pair(10, tsteps[10], N, tmp))
        from strategies.simulation import simulation_nodes

        nodes = simulation_nodes(_spec(10, 10, max(Ns), "flower", tmp))
        out["floor"] = [floor(nodes, tmp), floor(nodes, tmp, arrays=max(Ns) // nodes, values=16_000)]
    for p in out["parts"]:
        r = next(r for r in out["t_sweep"] if r["T"] == p["T"])
        p["flower_round_s"] = r["flower_round_s"]["median"]
        p["fused_round_s"] = r["fused_round_s"]["median"]
        p["orchestration_residual_s"] = p["flower_round_s"] - p["predicted_round_s"]
    return out
