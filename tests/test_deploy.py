"""A real deployment on loopback, through the scripts in deploy/: `flower-superlink` with TLS and
SuperNode authentication, three authenticated `flower-supernode`s, and `flwr run . FEDERATION`.

- a clean LTE run: every round merges all three heads, the run directory is complete and its
  model loads into the plain model builder;
- an unregistered SuperNode is refused (exit code 305, "Failed to activate");
- nodes that declare different `heads` and `rank` in their node config share four heads, and the
  run directory records the placement;
- a SuperNode that is stopped and restarted (same key, same state-dir) and another killed with
  SIGKILL mid-run: the dead node's head is handed on, the run finishes with a finite model and
  the ServerApp's log says what happened;
- every process the tests started is stopped by its PID (the scripts' PID files, then a sweep
  of the test's process sessions) and nothing is left listening on the test's ports.

Everything lives under a temp dir: certs, keys, a private FLWR_HOME, the SuperLink database,
node state and the run directory. Ports are free loopback ports, picked at start.
"""

from __future__ import annotations

import json
import re
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from deploy.loopback import (BIN, NODES, REPO, Deployment, descendants, free_port, kill_tree, make_credentials,
                             running, wait_gone, cmdline, in_sessions)
from lte_fed.models import build_model
from lte_fed.rundir import RunDir

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink not installed next to python"),
]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    """A CA + server cert, NODES registered node keys and one key that is never registered."""
    return make_credentials(tmp_path_factory.mktemp("creds"), NODES)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, credentials):
    d = Deployment(tmp_path_factory.mktemp("deploy"), credentials / "certs", credentials / "keys")
    try:
        d.start()
        yield d
    finally:
        leftovers, ports = d.stop()
    assert not leftovers, f"stop_all.sh left processes behind: {leftovers}"
    assert not in_sessions(d.sessions), f"still running: {in_sessions(d.sessions)}"
    assert not ports, f"still listening on {ports}"


def run_config(out: Path, steps: int, model: str = "vit_digits", extra: str = "") -> str:
    # Strings need TOML quotes inside --run-config ('...' or "..."); numbers and booleans not.
    return (f"data.name='synthetic' data.synthetic_size=256 model.name='{model}' lte.heads={NODES} lte.rank=4 "
            f"lte.alpha=32.0 lte.merge_every=2 train.batch_size=12 train.steps={steps} train.warmup=1 "
            f"quant.base='nf4' run.out='{out}' run.device='cpu' {extra}").strip()


def wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = RunDir(out).read_metrics() if (out / "metrics.jsonl").exists() else []
        if len(rows) >= n:
            return rows
        assert proc.poll() is None, f"flwr run ended (rc {proc.returncode}) before round {n}"
        time.sleep(0.5)
    raise TimeoutError(f"round {n} not done within {timeout:.0f} s")


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"flwr run failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def check_run_dir(out: Path, rounds: int, model: str = "vit_digits") -> list[dict]:
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert all(math.isfinite(r["test_loss"]) and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lte"]["heads"] == NODES and summary["config"]["data"]["name"] == "synthetic"
    assert (out / "checkpoint.safetensors").exists()
    state = RunDir(out).load_model()
    assert all(torch.isfinite(t).all() for t in state.values())
    plain = build_model(model, num_classes=10, img_size=8, in_chans=3)
    plain.load_state_dict(state, strict=True)
    return rows


# ----------------------------------------------------------------------------------- tests
def test_a_nodes_data_root_overrides_the_runs():
    from clients.client_app import _node_spec_json
    from lte_fed import protocol as P
    from lte_fed.spec import Spec

    spec_json = P.spec_to_json(Spec.from_dict({"data": {"root": "/run/data"}}).to_dict())
    assert _node_spec_json(spec_json, {"partition-id": 0}) == spec_json
    assert P.spec_from_json(_node_spec_json(spec_json, {"data-root": "/dev/data"}))["data"]["root"] == "/dev/data"


def test_a_nodes_threads_are_applied_and_bad_values_refused():
    import torch

    from clients.client_app import ClientConfigError, use_threads

    before = torch.get_num_threads()
    try:
        assert use_threads({"partition-id": 0}) == before  # absent: torch's default stays
        assert use_threads({"threads": 0}) == before
        assert use_threads({"threads": 1}) == 1 == torch.get_num_threads()
        for bad in ("two", -1, 1.5j):
            with pytest.raises(ClientConfigError, match="threads"):
                use_threads({"threads": bad})
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("config, needle", [
    ({"partition-id": "first"}, "partition-id='first' is not a number"),
    ({"partition-id": 0, "heads": 2.5}, "heads=2.5 is not a whole number"),
    ({"partition-id": 0, "heads": -1}, "heads=-1 must be >= 0"),
    ({"partition-id": 0, "memory-gb": "nan"}, "memory-gb='nan' is not a finite number"),
    ({"partition-id": 0, "memory-gb": "inf"}, "memory-gb='inf' is not a finite number"),
    ({"partition-id": 0, "rank": "1e400"}, "rank='1e400' is not a number"),
    ({"partition-id": True}, "partition-id=True is not a number"),  # was read as 1
])
def test_a_nodes_declared_capacity_is_refused_when_it_means_nothing(config, needle):
    from clients.client_app import ClientConfigError, node_capacity

    assert node_capacity({"partition-id": 3, "heads": 2, "memory-gb": "7.5"}) == \
        {"partition-id": 3, "heads": 2, "rank": 0, "memory-gb": 7.5}
    with pytest.raises(ClientConfigError, match=f"node config {re.escape(needle)}"):
        node_capacity(config)


def test_a_nodes_mmap_threshold_is_pinned_and_bad_values_refused():
    import platform

    from clients.client_app import ClientConfigError, use_mmap_threshold

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert use_mmap_threshold({}) is glibc  # the default, 8 MiB
    assert use_mmap_threshold({"mmap-threshold-mib": "0.5"}) is glibc
    assert use_mmap_threshold({"mmap-threshold-mib": 0}) is False  # glibc's own moving threshold
    for bad in ("big", -1, 33, 0.0001):  # 0.0001 MiB: every allocation over 104 bytes its own mmap
        with pytest.raises(ClientConfigError, match="mmap-threshold-mib"):
            use_mmap_threshold({"mmap-threshold-mib": bad})
    use_mmap_threshold({})


@pytest.fixture(scope="module")
def clean_run(deployment, tmp_path_factory):
    """One uninterrupted LTE run (2 rounds) through the deployment: (run dir, flwr run's output)."""
    tmp = tmp_path_factory.mktemp("clean")
    out, log = tmp / "run", tmp / "flwr-run.log"
    t0 = time.monotonic()
    text = finish(deployment.run(run_config(out, steps=4), log), log, timeout=400)
    print(f"2 rounds through the deployment in {time.monotonic() - t0:.1f} s")
    return out, text


def test_lte_runs_through_a_tls_authenticated_deployment(deployment, clean_run):
    nodes = subprocess.run([BIN / "flwr", "supernode", "list", deployment.federation], env=deployment.env,
                           capture_output=True, text=True, timeout=60)
    assert nodes.returncode == 0 and nodes.stdout.count("online") >= NODES, nodes.stdout + nodes.stderr
    out, text = clean_run
    rows = check_run_dir(out, rounds=2)
    print("wall_s per round:", [r["wall_s"] for r in rows])
    assert [r["merged_heads"] for r in rows] == [3, 3]
    assert "round 2: merged 3 of 3" in text, text[-4000:]  # the ServerApp's progress, streamed
    assert "not merged" not in text and "goes to node" not in text
    # every reply said what its message cost and how much memory its process peaked at, and no
    # ClientApp created a full-precision W while building its model (the watch, lte_fed/worker.py)
    for rnd in (1, 2):
        for head in range(NODES):
            line = next((ln for ln in text.splitlines() if f"round {rnd}: head {head} cost " in ln), None)
            assert line and "peak RSS" in line, f"no cost line for head {head} in round {rnd}:\n{text[-3000:]}"
    for r in rows:
        for key in ("start", "imports", "libs", "data", "model", "train", "reply"):
            assert r[f"client_{key}_s"] > 0, (key, r)
        assert r["client_rss_peak_mib"] > 100 and r["client_full_weights"] == 0, r
        assert 100 < r["client_rss_entry_mib"] <= r["client_rss_peak_mib"], r  # the peak before the job's work
        assert r["client_start_s"] > r["client_imports_s"] and r["client_overhead_s"] > 0, r
    # each node prepared its shard once and read it back from its state dir in round 2
    for i in range(NODES):
        assert len(list((deployment.state / f"node_{i}" / "shards").glob("*.safetensors"))) == 1
    # each node trained its own head (partition-id = head) and kept its state where it was told,
    # under the run's id
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    for i in range(NODES):
        assert sorted(p.name for p in (deployment.state / f"node_{i}" / run_id).iterdir()) == [
            f"head-{i}-r1.safetensors", f"head-{i}-r2.safetensors"]


def serverapp_of(d: Deployment) -> int | None:
    """The flwr-serverapp process the SuperLink runs (a descendant of the SuperLink's PID)."""
    found = [p for p in descendants(d.pid("superlink")) if "flwr-serverapp" in cmdline(p) and running(p)]
    return found[0] if found else None


def test_a_killed_server_resumes_to_the_uninterrupted_runs_weights(deployment, clean_run, tmp_path):
    """The ServerApp process is SIGKILLed after round 1's checkpoint; `flwr run` again with
    run.resume into a new directory finishes with the weights of the uninterrupted run, the
    nodes continuing their heads from their state dirs (AdamW included)."""
    d = deployment
    cut, log = tmp_path / "cut", tmp_path / "cut.log"
    proc = d.run(run_config(cut, steps=4), log)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint.safetensors").exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.2)
    pid = serverapp_of(d)
    assert pid is not None, "no flwr-serverapp under the SuperLink"
    assert not wait_gone(kill_tree(pid, signal.SIGKILL), 10)
    assert len(RunDir(cut).read_metrics()) == 1, "round 2 finished before the server was killed"
    kill_tree(proc.pid, signal.SIGTERM)  # `flwr run --stream` of the dead run
    proc.wait(timeout=30)

    resumed, log2 = tmp_path / "resumed", tmp_path / "resumed.log"
    text = finish(d.run(run_config(resumed, steps=4, extra=f"run.resume='{cut}'"), log2), log2, timeout=400)
    rows = check_run_dir(resumed, rounds=2)  # the whole history, round 1 from before the crash
    assert [r["merged_heads"] for r in rows] == [3, 3]
    assert "goes to node" not in text, text[-4000:]  # every node had its own head's state
    clean, now = RunDir(clean_run[0]).load_model(), RunDir(resumed).load_model()
    assert max(float((clean[k] - now[k]).abs().max()) for k in clean) == 0.0


def test_an_unregistered_supernode_is_refused(deployment, credentials, tmp_path):
    log = tmp_path / "stranger.log"
    with open(log, "w") as f:
        p = deployment.popen([BIN / "flower-supernode", "--superlink", f"127.0.0.1:{deployment.port}",
                              "--root-certificates", credentials / "certs" / "ca.crt",
                              "--auth-supernode-private-key", credentials / "stranger" / "node_0",
                              "--port", free_port(), "--node-config", "partition-id=0 num-partitions=3"],
                             stdout=f, stderr=subprocess.STDOUT)
    rc = p.wait(timeout=60)
    text = log.read_text(errors="replace")
    # Flower's exit code 305 is in the log; the process itself exits with status 1
    assert rc != 0 and "Exit Code: 305" in text and "Failed to activate SuperNode" in text, (rc, text)
    # the deploy script says so too, instead of leaving a dead node behind silently
    out = deployment.script("start_supernode.sh", 0, NODES, check=False,
                            env={"KEYS": str(credentials / "stranger"), "NODE_PORT": str(free_port()),
                                 "STATE": str(tmp_path / "stranger-state")})
    assert "exited at start" in out, out


def test_nodes_of_different_heads_and_rank_share_the_heads(deployment, tmp_path):
    """Nodes that declare what they carry (node config `heads`, `rank`): four heads go to node 0
    (two, at the run's rank 4), node 1 (one, rank 2) and node 2 (one, rank 8); the run completes
    and its run directory records which node trained which heads at which rank."""
    d = deployment
    d.restart_nodes({0: "heads=2", 1: "heads=1 rank=2", 2: "heads=1 rank=8"})
    try:
        out, log = tmp_path / "run", tmp_path / "flwr-run.log"
        config = run_config(out, steps=4).replace(f"lte.heads={NODES}", "lte.heads=4")
        text = finish(d.run(config, log), log, timeout=400)
        rows = RunDir(out).read_metrics()
        assert [r["merged_heads"] for r in rows] == [4, 4], text[-4000:]
        want = [{"node": 0, "heads": [0, 1], "ranks": [4, 4], "steps": 2}, {"node": 1, "heads": [2], "ranks": [2], "steps": 2},
                {"node": 2, "heads": [3], "ranks": [8], "steps": 2}]
        assert all(r["placement"] == want for r in rows), [r["placement"] for r in rows]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["placement"] == want
        # what each node declared, and the peak of the process that answered: a ClientApp with no
        # job, below the peak of any process that trained
        nodes = summary["nodes"]
        assert [(n["partition"], n["heads"], n["rank"]) for n in nodes] == [(0, 2, 0), (1, 1, 2), (2, 1, 8)]
        assert all(0 < n["idle_rss_mib"] < min(r["client_rss_peak_mib"] for r in rows) for n in nodes), nodes
        state = RunDir(out).load_model()
        assert all(torch.isfinite(t).all() for t in state.values())
        build_model("vit_digits", num_classes=10, img_size=8, in_chans=3).load_state_dict(state, strict=True)
    finally:
        d.restart_nodes({})  # the next test wants one head per node again


def sent_train_replies(d: Deployment, node: int) -> int:
    """Train replies the node has sent (its log counts every restart)."""
    sent, sending = 0, None
    for line in d.log(f"supernode_{node}").splitlines():  # the ClientApp's output interleaves
        if "Sending: " in line:
            sending = line.split("Sending: ", 1)[1].split()[0]
        elif "Sent successfully" in line:
            sent += sending == "train"
            sending = None
    return sent


# Slow (~2-3 min) by nature: a SIGKILLed node is noticed only after 2 x 30 s heartbeats. It runs
# last on the module's deployment (node 1 stays dead) and uses the small `mlp` model: every
# message starts a fresh flwr-clientapp process, and importing timm/torchvision for the ViT
# costs each of them seconds of CPU.
# The order of events is made certain, not left to timing: head 1 hangs in round 2 (the
# client's fault injection), so round 2 cannot end before node 1 is killed; node 2 is restarted
# after it answered round 2 and before node 1 dies, so the restart falls inside round 2.
def test_a_killed_node_is_survived_and_a_restarted_one_continues(deployment, tmp_path):
    d = deployment
    out, log = tmp_path / "run", tmp_path / "flwr-run.log"
    t0 = time.monotonic()
    before = sent_train_replies(d, 2)
    proc = d.run(run_config(out, steps=6, model="mlp", extra="run.round_timeout=150.0 run.fault='hang:1:2'"), log)
    wait_rows(out, 1, proc, timeout=300)

    # round 2 is under way and waits for head 1. Node 2 answers it, then is stopped (SIGTERM
    # deactivates it at once) and restarted with the same key and state-dir: it gets its node id
    # back, and in round 3 its head without a 'restore' - from its state-dir. It is stopped only
    # once the server has its reply: Flower answers "Node Unavailable" for a node gone offline
    # even where its reply is stored and not yet pulled.
    deadline = time.monotonic() + 120
    while sent_train_replies(d, 2) < before + 2 or "round 2: 2 of 3 nodes answered" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and proc.poll() is None, "nodes 0 and 2 did not answer round 2"
        time.sleep(0.5)
    pid2 = d.pid("supernode_2")
    assert not wait_gone(kill_tree(pid2, signal.SIGTERM), 30)
    restarted = time.time()
    d.start_node(2)
    assert d.pid("supernode_2") != pid2
    # then node 1, still hanging in round 2, is killed outright (its whole process tree), never to return
    assert len(RunDir(out).read_metrics()) == 1, "round 2 ended before node 1 was killed"
    assert not wait_gone(kill_tree(d.pid("supernode_1"), signal.SIGKILL), 10)

    text = finish(proc, log, timeout=400)
    rows = check_run_dir(out, rounds=3, model="mlp")
    merged = [r["merged_heads"] for r in rows]
    print(f"3 rounds, node 1 SIGKILLed and node 2 restarted in round 2, in {time.monotonic() - t0:.1f} s; "
          f"merged heads per round {merged}, wall_s {[r['wall_s'] for r in rows]}")
    events = "\n".join(line for line in text.splitlines() if "lte_fed" in line)
    print(events)
    # round 2 waited for the dead node and merged the two heads that answered ...
    assert merged[:2] == [3, 2], merged
    assert "round 2: head 1 (node" in text and "Node Unavailable" in text, text[-4000:]
    # ... then the dead node's head went to a live node with its state: all heads merge again
    assert "round 3: head 1 goes to node" in text, text[-4000:]
    assert merged[2] == 3, f"{merged}\n{events}\n--- node logs ---\n" + "\n".join(
        f"[node {i}] " + "\n".join(d.log(f"supernode_{i}").splitlines()[-15:]) for i in range(NODES))
    # the restarted node trained head 2 in round 3 from the state it had saved before the restart
    assert any(f.stat().st_mtime > restarted for f in (d.state / "node_2").glob("*/head-2-r3.safetensors"))
    assert "head 2 goes to node" not in text, text[-4000:]
    assert running(d.pid("supernode_2")) and running(d.pid("supernode_0"))
