"""The reply gate and the round's merge (lte_fed/ledger.py, protocol.screen_reply), fuzzed with
real Flower records: every malformed reply is rejected with a logged reason, the other heads
merge bit for bit as if it had never answered, and a round of nothing but bad replies leaves W
and every head state bit-identical."""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from lte_fed import protocol as P
from lte_fed import uplink as U
from lte_fed.job import setup
from lte_fed.ledger import RoundMerge, update_norm
from strategies.lte_strategy import LTEStrategy

from .helpers import quick_spec

HEADS, BAD = 4, 1  # head BAD is the one that misbehaves


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    spec = quick_spec("lte", "flower", lte={"heads": HEADS}, train={"batch_size": 16})
    return LTEStrategy(spec, setup(spec), tmp_path_factory.mktemp("run"))


def trained(server, head: int) -> dict[str, torch.Tensor]:
    """A plausible reply of `head`: its factors after some training (seeded), replicas nudged."""
    g = torch.Generator().manual_seed(100 + head)
    out = {}
    for k, t in server.ledger[head].state.items():
        if ".corr_" in k:
            continue
        noise = torch.randn(t.shape, generator=g) * (0.01 if k.endswith("lora_B") else 1e-3)
        out[k] = (t + noise).float()
    return out


def arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A head state as a worker sends it (comm.up=fp32: packed into one array, uplink.py)."""
    return ArrayRecord(P.wire(U.encode(state, "fp32")))


def content(state: dict[str, torch.Tensor], head: int, **metrics) -> RecordDict:
    return wire_content(U.encode(state, "fp32"), head, **metrics)


def wire_content(wire: dict[str, torch.Tensor], head: int, **metrics) -> RecordDict:
    """A reply carrying exactly the arrays `wire`."""
    m = {"head": head, "train_loss": 1.5} | metrics
    return RecordDict({P.HEAD: ArrayRecord(P.wire(wire)), P.METRICS: MetricRecord(m)})


def packed(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return U.encode(state, "fp32")["values"]


def raw_array(t: np.ndarray, **over) -> Array:
    buf = io.BytesIO()
    np.save(buf, t, allow_pickle=False)
    fields = {"dtype": str(t.dtype), "shape": tuple(t.shape), "stype": "numpy.ndarray", "data": buf.getvalue()} | over
    return Array(**fields)


def with_array(state, key, array: Array, head: int) -> RecordDict:
    rec = arrays(state)
    rec[key] = array
    return RecordDict({P.HEAD: rec, P.METRICS: MetricRecord({"head": head, "train_loss": 1.5})})


def lora_key(state, part="lora_B"):
    return next(k for k in state if k.endswith(part))


def replica_key(state):
    return next(k for k in state if not k.endswith(("lora_A", "lora_B")))


def _scaled(state, key, value):
    return state | {key: torch.full_like(state[key], value)}


# (name, builder(state, head) -> (content, error)); each a distinct way a reply can be wrong.
def _c(f):
    return lambda s, h: (f(s, h), None)


MALFORMED = {
    "not a RecordDict": _c(lambda s, h: "garbage"),
    "content None": _c(lambda s, h: None),
    "no head record": _c(lambda s, h: RecordDict({P.METRICS: MetricRecord({"head": h, "train_loss": 1.0})})),
    "head is a ConfigRecord": _c(lambda s, h: RecordDict({P.HEAD: ConfigRecord({"x": 1}),
                                                          P.METRICS: MetricRecord({"head": h, "train_loss": 1.0})})),
    "head is a MetricRecord": _c(lambda s, h: RecordDict({P.HEAD: MetricRecord({"x": 1.0}),
                                                          P.METRICS: MetricRecord({"head": h, "train_loss": 1.0})})),
    "truncated bytes": _c(lambda s, h: with_array(s, "values", raw_array(packed(s).numpy(), data=b"\x93NUMPY\x01\x00v"), h)),
    "unknown serialization": _c(lambda s, h: with_array(s, "values", raw_array(packed(s).numpy(), stype="pickle"), h)),
    "string array": _c(lambda s, h: with_array(s, "values", raw_array(np.array(["a", "b"])), h)),
    "float128 array": _c(lambda s, h: with_array(s, "values", raw_array(packed(s).numpy().astype(np.longdouble)), h)),
    "object-free garbage bytes": _c(lambda s, h: with_array(s, "values", raw_array(np.zeros(2), data=b"not numpy"), h)),
    "missing lora_A": _c(lambda s, h: content({k: v for k, v in s.items() if k != lora_key(s, "lora_A")}, h)),
    "missing replica": _c(lambda s, h: content({k: v for k, v in s.items() if k != replica_key(s)}, h)),
    "extra tensor": _c(lambda s, h: content(s | {"evil.weight": torch.zeros(3)}, h)),
    "B at another rank": _c(lambda s, h: content(s | {lora_key(s): torch.cat([s[lora_key(s)]] * 2, 1)}, h)),
    "empty arrays": _c(lambda s, h: wire_content({}, h)),
    "unpacked, one array per tensor": _c(lambda s, h: wire_content(s, h)),
    "packed under another name": _c(lambda s, h: wire_content({"delta": packed(s)}, h)),
    "an extra array": _c(lambda s, h: wire_content({"values": packed(s), "evil": torch.zeros(3)}, h)),
    "values one short": _c(lambda s, h: wire_content({"values": packed(s)[:-1]}, h)),
    "values as a column": _c(lambda s, h: wire_content({"values": packed(s)[:, None]}, h)),
    "values a scalar": _c(lambda s, h: wire_content({"values": torch.tensor(0.5)}, h)),
    "values as float64": _c(lambda s, h: wire_content({"values": packed(s).double()}, h)),
    "values as float16": _c(lambda s, h: wire_content({"values": packed(s).half()}, h)),
    "values as int64": _c(lambda s, h: wire_content({"values": packed(s).long()}, h)),
    "NaN in B": _c(lambda s, h: content(_scaled(s, lora_key(s), float("nan")), h)),
    "inf in A": _c(lambda s, h: content(_scaled(s, lora_key(s, "lora_A"), float("inf")), h)),
    "-inf in a replica": _c(lambda s, h: content(_scaled(s, replica_key(s), float("-inf")), h)),
    "1e30 in B": _c(lambda s, h: content(_scaled(s, lora_key(s), 1e30), h)),
    "1e20 in A and B": _c(lambda s, h: content(_scaled(_scaled(s, lora_key(s), 1e20), lora_key(s, "lora_A"), 1e20), h)),
    "1e30 in a replica": _c(lambda s, h: content(_scaled(s, replica_key(s), 1e30), h)),
    "B 1000x the others'": _c(lambda s, h: content(s | {k: v * 1e3 for k, v in s.items() if k.endswith("lora_B")}, h)),
    "no metrics": _c(lambda s, h: RecordDict({P.HEAD: arrays(s)})),
    "metrics is an ArrayRecord": _c(lambda s, h: RecordDict({P.HEAD: arrays(s),
                                                             P.METRICS: ArrayRecord({"x": torch.zeros(1)})})),
    "no train_loss": _c(lambda s, h: RecordDict({P.HEAD: arrays(s), P.METRICS: MetricRecord({"head": h})})),
    "train_loss a string": _c(lambda s, h: RecordDict({P.HEAD: arrays(s),
                                                       P.METRICS: ConfigRecord({"head": h, "train_loss": "low"})})),
    "train_loss NaN": _c(lambda s, h: content(s, h, train_loss=float("nan"))),
    "claims another head": _c(lambda s, h: content(s, h + 1)),
    "error reply": lambda s, h: (None, "worker out of memory"),
}


def fresh(server) -> tuple:
    """A copy of the server's W, replicas and ledger, so every case starts from the same state."""
    return copy.deepcopy(server.W), copy.deepcopy(server.replicas), copy.deepcopy(server.ledger)


def merge(server, replies: dict[int, list[tuple]], heads=range(HEADS)):
    """Run one round on a copy of the server state: replies[h] = [(content, error), ...]."""
    W, replicas, ledger = fresh(server)
    rnd = RoundMerge(1, ledger, W, replicas, server.layout, scale=server.cfg.scale, variant=server.cfg.variant,
                     guard=server.guard)
    for h in heads:
        rnd.expect(h, 100 + h)
    reasons = {}
    for h, answers in replies.items():
        for c, err in answers:
            reasons.setdefault(h, []).append(rnd.receive(h, c, err))
    return rnd.close(), W, replicas, ledger, reasons


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_at_least_30_distinct_malformations():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_reply_is_rejected_and_the_others_merge_bit_for_bit(server, case, caplog):
    good = {h: trained(server, h) for h in range(HEADS)}
    reference = merge(server, {h: [(content(good[h], h), None)] for h in range(HEADS) if h != BAD})
    caplog.set_level(logging.ERROR, logger="lte_fed.server")
    bad = MALFORMED[case](good[BAD], BAD)
    result, W, replicas, ledger, reasons = merge(
        server, {h: [bad if h == BAD else (content(good[h], h), None)] for h in range(HEADS)})
    assert result.merged == [h for h in range(HEADS) if h != BAD] == reference[0].merged
    reason = result.rejected[BAD]  # refused at the gate (receive) or by the size guard (close)
    assert reason and reasons[BAD][0] in (None, reason)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"head {BAD} (node {100 + BAD}) not merged: {reason}" in logged
    assert same(W, reference[1]) and same(replicas, reference[2])
    for h in range(HEADS):
        assert same(ledger[h].state, reference[3][h].state), h
    assert ledger[BAD].holder is None and not ledger[BAD].committed  # restored from the server next time


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_round_of_only_bad_replies_changes_nothing(server, case):
    good = {h: trained(server, h) for h in range(HEADS)}
    result, W, replicas, ledger, _ = merge(server, {h: [MALFORMED[case](good[h], h)] for h in range(HEADS)})
    if case == "B 1000x the others'":  # the same scale everywhere is no outlier: caught by size, or merged
        return
    assert result.merged == [] and sorted(result.rejected) == list(range(HEADS))
    assert same(W, server.W) and same(replicas, server.replicas)
    assert all(same(ledger[h].state, server.ledger[h].state) for h in range(HEADS))


def test_the_first_answer_of_a_head_wins(server, caplog):
    good = {h: trained(server, h) for h in range(HEADS)}
    other = trained(server, 3)
    caplog.set_level(logging.ERROR, logger="lte_fed.server")
    first, *_ = merge(server, {h: [(content(good[h], h), None)] for h in range(HEADS)})
    result, W, _, ledger, reasons = merge(
        server, {h: [(content(good[h], h), None)] + ([(content(other, h), None)] if h == BAD else []) for h in range(HEADS)})
    assert reasons[BAD][1] and "second answer" in reasons[BAD][1]
    assert same(W, merge(server, {h: [(content(good[h], h), None)] for h in range(HEADS)})[1])
    assert result.merged == first.merged == list(range(HEADS))


def test_a_reply_for_a_head_not_sent_is_ignored(server):
    good = {h: trained(server, h) for h in range(HEADS)}
    result, W, *_ = merge(server, {h: [(content(good[h], h), None)] for h in range(HEADS)}, heads=range(HEADS - 1))
    assert result.merged == list(range(HEADS - 1)) and HEADS - 1 not in result.rejected


def test_update_norm_matches_the_dense_product():
    g = torch.Generator().manual_seed(0)
    B, A, VB, VA = (torch.randn(s, generator=g) for s in ((7, 3), (3, 5), (7, 3), (3, 5)))
    dense = float((2.5 * (B.double() @ A.double() - VB.double() @ VA.double())).norm())
    assert abs(update_norm(B, A, VB, VA, 2.5) - dense) < 1e-9 * dense
    assert update_norm(torch.full((7, 3), 1e20), torch.full((3, 5), 1e20), None, None, 1.0) > 1e38


def test_a_node_declaring_a_rank_no_layer_can_have_is_left_out_and_a_shared_partition_is_named(server, caplog):
    """One node's `rank=100000000` made the ServerApp allocate that head's factors (9.6 GB) and
    die, for the whole fleet; two nodes with one partition-id were accepted without a word."""
    from lte_fed.placement import NodeInfo
    from strategies.grid_utils import PartitionMap

    top = max(min(w.shape) for w in server.W.values())
    assert server._check_node(NodeInfo(7, 1, rank=top)) is None
    assert f"declares rank {10**8}, above every LoRA layer's min(out, in) (at most {top})" in \
        server._check_node(NodeInfo(7, 1, rank=10**8))
    nodes = PartitionMap()
    nodes.add(NodeInfo(7, 0))
    with caplog.at_level(logging.WARNING, logger="strategies.grid_utils"):
        nodes.add(NodeInfo(8, 0))
    assert "node 8 declares partition-id 0, as node 7 did" in caplog.text


def test_a_node_that_declares_memory_counts_for_the_heads_its_memory_holds(server):
    """Before round 1 the server waits until the nodes carry every head: a `memory-gb` node
    counted for one head whatever its memory held, so two nodes too small for any head started
    the run, and every round merged nothing."""
    from lte_fed.placement import NodeInfo

    assert server.carried([NodeInfo(11, 0, memory_gb=1e-6), NodeInfo(12, 1, memory_gb=1e-6)]) == 0
    assert server.carried([NodeInfo(13, 2, memory_gb=64.0)]) > HEADS  # a big node holds many small heads
    assert server.carried([NodeInfo(14, 3), NodeInfo(15, 4, heads=3, memory_gb=1e-6)]) == 1 + 3  # heads wins


def test_a_node_restarted_with_another_node_config_is_placed_by_what_its_replies_declare(server, caplog):
    """A node restarted mid-run with the same key keeps its node id, and the server asked only
    new ids: a node restarted with fewer heads (say after running out of memory) was sent its old
    share every round. Each TRAIN reply now says what its node declares."""
    from lte_fed.placement import NodeInfo
    from strategies.grid_utils import PartitionMap

    nodes = PartitionMap(check=server._check_node)
    nodes.add(NodeInfo(7, 0, heads=3, idle_rss_mib=500.0))
    said = lambda **m: MetricRecord({"partition": 0, "node_heads": 3, "node_rank": 0, "node_memory_gb": 0.0} | m)  # noqa: E731
    nodes.redeclare(7, said())
    assert nodes.info[7] == NodeInfo(7, 0, heads=3, idle_rss_mib=500.0)
    with caplog.at_level(logging.WARNING, logger="lte_fed.server"):
        nodes.redeclare(7, said(node_heads=1, node_memory_gb=7.5))
    assert nodes.info[7] == NodeInfo(7, 0, heads=1, memory_gb=7.5, idle_rss_mib=500.0)
    assert "node of partition 0 now declares heads 1, memory 7.5 GB" in caplog.text
    nodes.redeclare(7, said(partition=2, node_heads=1, node_memory_gb=7.5))  # another partition-id
    assert nodes.node_of == {2: 7}
    for bad in (said(node_heads=-1), said(node_rank=1.5), said(node_heads=float("nan")), said(node_heads=[1, 2]),
                MetricRecord({"partition": 0}), ConfigRecord({"partition": 2, "node_heads": True, "node_rank": 0,
                                                                "node_memory_gb": 0.0})):
        nodes.redeclare(7, bad)  # what is not a declaration changes nothing
        assert nodes.info[7].heads == 1 and nodes.info[7].partition == 2
    with caplog.at_level(logging.ERROR, logger="strategies.grid_utils"):
        nodes.redeclare(7, said(partition=2, node_rank=10**8))  # no layer has that rank: left out
    assert 7 not in nodes.info and "node 7 is left out of the run" in caplog.text
    nodes.add(NodeInfo(8, 1))
    nodes.ask_again(8)  # its message failed: the next discover asks it what it declares now
    assert 8 not in nodes.known and nodes.info[8] == NodeInfo(8, 1)


def test_a_node_asked_again_whose_node_config_went_bad_gets_no_more_heads(server, caplog):
    """A node whose message failed is asked again; if its QUERY now fails (a bad node config
    after a restart), what it declared before must not keep placing heads there."""
    from lte_fed.placement import NodeInfo
    from strategies.grid_utils import PartitionMap

    nodes = PartitionMap(check=server._check_node)
    nodes.add(NodeInfo(7, 0, heads=2))
    nodes.ask_again(7)
    nodes._refuse(7, "node config partition-id='one' is not a number")  # what discover does with its error
    assert 7 not in nodes.info and nodes.node_of == {} and nodes.nodes({7}) == []
