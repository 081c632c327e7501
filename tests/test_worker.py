"""The worker's build (lte_fed/worker.py): a head from the meta-device skeleton is the head a full
model gives, without a full-precision W ever created; the shard cache gives the same batches and
survives damage; the FedAvg worker takes the received weights as its own."""

from __future__ import annotations

import pytest
import torch

from lte_fed import costs
from lte_fed import worker as W
from lte_fed.job import batch_source, lte_config, setup
from lte_fed.lte import HeadLTE
from lte_fed.spec import Spec, SpecError


def spec(**over) -> Spec:
    d = {"data": {"name": "synthetic", "synthetic_size": 96}, "model": {"name": "vit_digits"},
         "lte": {"heads": 3, "rank": 4}, "train": {"batch_size": 12}, "quant": {"base": "nf4"}}
    for k, v in over.items():
        d[k] = d.get(k, {}) | v
    return Spec.from_dict(d)


@pytest.mark.parametrize("base", ["nf4", "nf4-dq"])
def test_a_head_built_from_the_skeleton_is_the_full_models_head_and_no_W_is_created(tmp_path, base):
    s = spec(quant={"base": base})
    full = setup(s)
    job, _ = W.node_data(s, 1, tmp_path)
    shapes = W.lora_shapes_of(job)
    assert (192, 64) in shapes and all(p.is_meta for p in job.plain.parameters())
    for head in (0, 2):
        ref = HeadLTE(full.plain, lte_config(s), head)
        with W.FullWeightWatch(shapes) as watch:
            model = W.head_model(job, head)
            W.fill_head(model, ref.base_state(), ref.replica_state())
        assert watch.count == 0, watch.seen
        got, want = model.head_state(with_corr=True), ref.head_state(with_corr=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # A from (seed, head)
        assert all(torch.equal(a, b) for a, b in zip(model.base_state().values(), ref.base_state().values()))
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(head))
        assert torch.equal(model(x), ref(x))
    # the watch does see a full-precision W: parameterizing the full model quantizes it
    with W.FullWeightWatch(shapes) as watch:
        HeadLTE(full.plain, lte_config(s), 0)
    assert watch.count > 0


def test_the_watch_leaves_out_a_W_shape_a_LoRA_factor_shares(tmp_path):
    """digits (1 channel, 2x2 patches): the patch embedding's W is (64, 4), as every rank-4 B of
    a 64-wide layer is; a deployed node logged each B as a full-precision W."""
    s = spec(data={"name": "digits"}, lte={"heads": 2, "rank": 4})
    job, _ = W.node_sources(s, [0], tmp_path)
    shapes = W.lora_shapes_of(job)
    assert (64, 4) in shapes and (192, 64) in shapes
    watched = W.watched(shapes, [4])
    assert (64, 4) not in watched and (192, 64) in watched
    with W.FullWeightWatch(watched) as watch:
        W.node_model(job, [0], [4])
    assert watch.count == 0, watch.seen


def test_a_nodes_stacked_heads_built_from_the_skeleton_are_the_full_models_and_no_W_is_created(tmp_path):
    """Two heads of different rank (zero-padded, per-head scales) on one q(W): the node's model
    from the skeleton trains exactly as the same StackedLTE built from the full model."""
    from lte_fed.lora import StackedLoRALinear
    from lte_fed.lte import StackedLTE
    from lte_fed.node import train_heads

    s = spec(lte={"heads": 3, "rank": 4, "variant": "exact"})
    full = setup(s)
    heads, ranks = [2, 0], [2, 4]
    ref = StackedLTE(full.plain, lte_config(s), heads, ranks)
    ref_head = HeadLTE(full.plain, lte_config(s), 0)  # the server's q(W) as a message carries it
    job, src = W.node_sources(s, heads, tmp_path)
    with W.FullWeightWatch(W.lora_shapes_of(job)) as watch:
        model = W.node_model(job, heads, ranks)
        W.fill_node(model, ref_head.base_state(), ref_head.replica_state())
    assert watch.count == 0, watch.seen
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ref.load_base_state(ref_head.base_state())
    # The node dequantizes per use, so it never folds a step's s·B A into kept bases; the
    # reference, which keeps them, is made to take the node's path (the same math, other rounding,
    # which AdamW's first steps amplify on near-zero gradients).
    for layer in ref.modules():
        if isinstance(layer, StackedLoRALinear):
            layer.fold_steps = False
    for i in range(2):
        got, want = model.head_state(i, with_corr=True), ref.head_state(i, with_corr=True)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lr = lambda step: 1e-2  # noqa: E731
    losses = []
    for m in (model, ref):
        opt = torch.optim.AdamW(m.head_params(), lr=1e-2)
        source = src if m is model else batch_source(full)
        losses.append(train_heads(m, opt, source, 0, 3, lr=lr, clip=1.0, device=torch.device("cpu")))
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5), losses
    for i in range(2):
        got, want = model.head_state(i), ref.head_state(i)
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    # Between steps the node keeps no fp32 m×n: neither q(W) dequantized nor the per-head folds
    # W - s·V_n (the fused engine's reference keeps both).
    layers = [m for m in model.modules() if isinstance(m, StackedLoRALinear)]
    assert layers and not any(k in m.__dict__ for m in layers for k in ("_fold_cache", "_deq_cache"))
    assert any("_fold_cache" in m.__dict__ for m in ref.modules() if isinstance(m, StackedLoRALinear))


_WORKER_WITHOUT_BITSANDBYTES = """
import json, sys, torch
import clients.client_app
from lte_fed import worker as W
from lte_fed.node import train_heads
from lte_fed.spec import Spec
from lte_fed.train import make_optimizer
spec = Spec.from_dict(json.loads(sys.argv[1]))
sent = torch.load(sys.argv[2])
W.job_imports(spec)
job, src = W.node_sources(spec, [1], sys.argv[3])
model = W.node_model(job, [1])
W.fill_node(model, sent["base"], sent["replicas"])
losses = train_heads(model, make_optimizer(model.head_params(), 1e-2, 0.0), src, 0, 2, lr=lambda step: 1e-2,
                     clip=1.0, device=torch.device("cpu"))
print(repr({"losses": losses, "bitsandbytes": sorted(m for m in sys.modules if m.startswith("bitsandbytes"))}))
"""


@pytest.mark.parametrize("base", ["nf4-dq", "int8"])
def test_a_worker_trains_on_a_quantized_base_without_importing_bitsandbytes(tmp_path, base):
    """Importing bitsandbytes costs seconds per message in a deployment (a fresh process each):
    a worker only dequantizes, which lte_fed.quant does itself. A fresh interpreter runs the
    worker's path (ClientApp module, job libraries, skeleton, fill, two steps) on a q(W) made here."""
    import ast
    import json
    import subprocess
    import sys
    from pathlib import Path

    s = spec(quant={"base": base})
    ref = HeadLTE(setup(s).plain, lte_config(s), 1)
    torch.save({"base": ref.base_state(), "replicas": ref.replica_state()}, tmp_path / "sent.pt")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _WORKER_WITHOUT_BITSANDBYTES, json.dumps(s.to_dict()), str(tmp_path / "sent.pt"),
                          str(tmp_path / "cache")], cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert got["bitsandbytes"] == [], got["bitsandbytes"]
    assert len(got["losses"]) == 2 and all(0 < v < 10 for step in got["losses"] for v in step), got["losses"]


def test_a_message_without_the_whole_base_is_refused(tmp_path):
    s = spec()
    job, _ = W.node_data(s, 0, tmp_path)
    ref = HeadLTE(setup(s).plain, lte_config(s), 0)
    base = dict(ref.base_state())
    base.pop(next(iter(base)))
    model = W.head_model(job, 0)
    try:
        W.fill_head(model, base, ref.replica_state())
    except KeyError as e:
        assert "lacks 1 tensor" in str(e)
    else:
        raise AssertionError("a base with a tensor missing was accepted")


def test_the_cached_shard_gives_the_same_batches_and_a_damaged_one_is_rebuilt(tmp_path):
    for s in (spec(), spec(data={"partition": "dirichlet", "alpha": 0.5}, train={"batch_size": 12})):
        whole = batch_source(setup(s))
        for head in range(3):
            (_, src), (_, again) = W.node_data(s, head, tmp_path), W.node_data(s, head, tmp_path)
            for step in (0, 7, 50):
                for got in (src, again):
                    xa, ya = whole.batch(head, step, torch.device("cpu"))
                    xb, yb = got.batch(head, step, torch.device("cpu"))
                    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    files = sorted((tmp_path / W.SHARDS).glob("*.safetensors"))
    assert len(files) == 6 and not list((tmp_path / W.SHARDS).glob("*.tmp"))
    s = spec()
    key = W.shard_key(s, 2)
    for f in files:  # find head 2's file of the iid spec, then cut it in half
        if W._read_shard(f, key)[0] is not None:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            break
    _, src = W.node_data(s, 2, tmp_path)  # rebuilt, not trusted
    xa, _ = batch_source(setup(s)).batch(2, 3, torch.device("cpu"))
    assert torch.equal(src.batch(2, 3, torch.device("cpu"))[0], xa)
    assert W._read_shard(f, key)[0] is not None
    # a node's job holds one shard, but names the whole set it was cut from (read or rebuilt)
    assert W.node_data(s, 2, tmp_path)[0].data_id == setup(s).data_id == W._read_shard(f, key)[1]


def test_the_fedavg_worker_takes_the_received_weights_as_they_are(tmp_path):
    s = Spec.from_dict(spec().to_dict() | {"method": "fedavg"})
    state = {k: v.clone() for k, v in setup(s).plain.state_dict().items()}
    job, _ = W.node_data(s, 0, tmp_path)
    model = W.plain_model(job, state)
    got = model.state_dict()
    assert all(got[k].data_ptr() == state[k].data_ptr() for k in state)  # no copy, no random model


def test_round_costs_take_the_worst_head():
    per_head = {0: {"start_s": 4.0, "data_s": 0.5, "model_s": 1.0, "train_s": 10.0, "reply_s": 0.2,
                    "rss_peak_mib": 700.0, "full_weights": 0},
                1: {"start_s": 5.0, "data_s": 0.1, "model_s": 1.0, "train_s": 12.0, "reply_s": 0.3,
                    "rss_peak_mib": 650.0, "full_weights": 0}}
    row = costs.round_costs(per_head)
    assert row["client_train_s"] == 12.0 and row["client_rss_peak_mib"] == 700.0 and row["client_start_s"] == 5.0
    assert row["client_overhead_s"] == round(5.0 + 0.1 + 1.0 + 0.3, 3)  # the slowest worker's non-training time
    assert costs.round_costs({}) == {}


class _TwoNodes:
    """A strategy with two nodes (ids 100, 101; partitions 0, 1) registered, and what the real
    ClientApp handler needs to serve them in this process: a Grid that lists them and their
    Contexts."""

    nodes = [100, 101]

    def __init__(self, s: Spec, tmp_path):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from lte_fed.placement import NodeInfo
        from strategies.lte_strategy import LTEStrategy

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.strategy = LTEStrategy(s, setup(s), tmp_path / "run")
        for i, node in enumerate(self.nodes):
            self.strategy.partitions.add(NodeInfo(node, i))
        self.contexts = {n: Context(1, n, {"partition-id": i}, RecordDict(), {}) for i, n in enumerate(self.nodes)}

    def get_node_ids(self):
        return list(self.nodes)


def _client_rounds(tmp_path, keep: bool, rounds: int = 3) -> dict[str, torch.Tensor]:
    """`rounds` rounds of N=4 heads on 2 nodes, both served by this one process (as one Ray
    actor may serve every node), through the strategy and the ClientApp's real handler; keep:
    the process reuses its node model across messages, else it builds one per message."""
    from flwr.app import ConfigRecord

    import clients.client_app as CA

    s = spec(lte={"heads": 4, "merge_every": 2, "variant": "exact"}, train={"batch_size": 8, "steps": 2 * rounds},
             run={"engine": "flower", "out": str(tmp_path / "run")})
    grid = _TwoNodes(s, tmp_path)
    strategy, contexts = grid.strategy, grid.contexts
    built = 0
    for rnd in range(1, rounds + 1):
        replies = []
        for i, msg in enumerate(strategy.configure_train(rnd, None, ConfigRecord(), grid)):
            msg.metadata.__dict__["_message_id"] = f"down-{rnd}-{i}"
            if not keep:
                CA._KEPT.clear()
            built += not CA._KEPT
            reply = CA.train(msg, contexts[msg.metadata.dst_node_id])
            # the handler let go of the message's arrays once they were in its model
            assert CA.P.BASE not in msg.content and CA.P.REPLICAS not in msg.content and CA.P.CONFIG in msg.content
            reply.metadata.__dict__["_message_id"] = f"up-{rnd}-{i}"
            replies.append(reply)
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["merged_heads"] == 4
    CA._KEPT.clear()
    assert built == (1 if keep else 2 * rounds)
    return strategy.plain_state()


def test_a_kept_node_model_serving_other_heads_trains_what_fresh_builds_train(tmp_path):
    kept, fresh = _client_rounds(tmp_path / "kept", keep=True), _client_rounds(tmp_path / "fresh", keep=False)
    assert kept.keys() == fresh.keys()
    assert all(torch.equal(kept[k], fresh[k]) for k in kept)


def test_a_nodes_state_file_is_packed_read_back_exactly_and_a_damaged_layout_is_named(tmp_path):
    from flwr.app import Context, RecordDict
    from safetensors.torch import save_file

    import clients.client_app as CA

    store = CA.StateFiles(Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {}), spec(), "run1", "head-0")
    gen = torch.Generator().manual_seed(0)
    head = {"a.lora_A": torch.randn(4, 6, generator=gen), "a.lora_B": torch.randn(6, 4, generator=gen)[:, :2],
            "pos": torch.randn(1, 3, 6, generator=gen), "empty": torch.zeros(0, 5)}
    opt = {"0.step": torch.tensor(7.0), "0.exp_avg": torch.randn(4, 6, generator=gen), "1.count": torch.tensor([3, 4])}
    store.save(head, opt, rnd=2, keep_from=0)
    got = store.load(2)
    want = CA.prefixed("head", head) | CA.prefixed("opt", opt)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    # a file written before packing (one tensor per name) still loads
    save_file({k: t.contiguous() for k, t in want.items()}, str(store._file(3)))
    assert all(torch.equal(store.load(3)[k], want[k]) for k in want)
    # a layout that points outside its buffer is an error naming the file
    packed, _ = CA.P.pack_tensors(want)
    save_file(packed, str(store._file(4)), metadata={CA.LAYOUT: '[["x", "float32", [1000], 0]]'})
    with pytest.raises(ValueError, match=r"head-0-r4.*layout"):
        store.load(4)


def test_a_packed_record_travels_through_flower_arrays_exactly_and_a_bad_one_says_why():
    from flwr.app import ArrayRecord

    from lte_fed import protocol as P

    gen = torch.Generator().manual_seed(1)
    state = {"l.base.weight": torch.randn(6, 4, generator=gen), "l.base.absmax": torch.rand(3, generator=gen),
             "l.base.packed": torch.randint(0, 255, (12,), generator=gen, dtype=torch.uint8),
             "norm": torch.randn(4, generator=gen).bfloat16(), "scalar": torch.tensor(2.5), "none": torch.zeros(0, 3)}
    record = ArrayRecord(P.pack_wire(state))
    assert len(record) == 3  # float32, uint8 and the layout: bfloat16 travels as float32 (P.wire)
    got = P.unpack_wire(record.to_torch_state_dict())
    assert list(got) == list(state)
    for k, t in state.items():
        want = t.float() if t.dtype == torch.bfloat16 else t
        assert got[k].dtype == want.dtype and got[k].shape == want.shape and torch.equal(got[k], want), k
    assert P.unpack_wire(P.pack_wire({})) == {}
    packed = P.pack_wire(state)
    bad_layouts = {
        "without its 'layout'": {k: t for k, t in packed.items() if k != P.PACKED_LAYOUT},
        "outside its buffer": packed | {"packed.float32": packed["packed.float32"][:-1]},
        "no 'uint8' buffer": {k: t for k, t in packed.items() if k != "packed.uint8"},
        "not a list": packed | {P.PACKED_LAYOUT: torch.tensor(list(b'{"a": 1}'), dtype=torch.uint8)},
        r"not \[name, dtype, shape, offset\]": packed | {
            P.PACKED_LAYOUT: torch.tensor(list(b'[["x", "float32", [-2, 3], 0]]'), dtype=torch.uint8)},
        "does not match": packed | {P.PACKED_LAYOUT: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)},
    }
    for why, record in bad_layouts.items():
        with pytest.raises(ValueError, match=why):
            P.unpack_wire(record)


@pytest.mark.parametrize("fault, heads, partition, rnd, slept", [
    ("slow3:node1:*", [0, 2], 1, 4, 0.03),  # the slow device, whatever heads it holds
    ("slow3:node1:*", [1], 0, 4, 0.0),  # another node, holding head 1: not slowed
    ("slow3:node1:2", [0], 1, 3, 0.0),  # the slow device, another round
    ("slow3:1:*", [0, 1], 0, 4, 0.03),  # keyed by head: whichever node holds it
    ("slow3:1:*", [0, 2], 1, 4, 0.0),
    ("nan:1:4", [1], 1, 4, 0.0),  # not a slow fault
])
def test_a_slow_fault_follows_its_head_or_its_node(fault, heads, partition, rnd, slept):
    from clients.client_app import _slow_down

    assert _slow_down(Spec.from_dict({"run": {"fault": fault}}), heads, partition, rnd, 0.01) == pytest.approx(slept)


@pytest.mark.parametrize("deadline_steps", ["fit", "fixed"])
def test_under_a_deadline_a_node_too_slow_for_t_steps_is_sent_the_steps_that_fit(tmp_path, deadline_steps):
    """The replies say node 101 trains at 0.5 s a step (node 100 at 0.01) with 0.4 s of other
    work. Round 1's set no pace (the server's first round includes every node's start-up);
    after round 2's, under a 2 s deadline, `fit` sends node 101 the 2 of T=4 steps that fit in
    0.8 of the deadline ((1.6 - 0.4) / 0.5), the ClientApp trains exactly those, and both heads
    merge; `fixed` sends every node T."""
    from flwr.app import ConfigRecord

    import clients.client_app as CA

    s = spec(lte={"heads": 2, "merge_every": 4}, train={"batch_size": 8, "steps": 12},
             run={"engine": "flower", "out": str(tmp_path / "run"), "round_deadline": 2.0,
                  "deadline_steps": deadline_steps})
    grid = _TwoNodes(s, tmp_path)
    strategy, contexts = grid.strategy, grid.contexts
    sent_steps = []
    for rnd in (1, 2, 3):
        replies, steps = [], {}
        for i, msg in enumerate(strategy.configure_train(rnd, None, ConfigRecord(), grid)):
            msg.metadata.__dict__["_message_id"] = f"down-{rnd}-{i}"
            steps[msg.metadata.dst_node_id] = int(msg.content["config"]["steps"])
            reply = CA.train(msg, contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_message_id"] = f"up-{rnd}-{i}"
            for m in reply.content.metric_records.values():
                assert int(m["steps"]) == steps[msg.metadata.dst_node_id]  # what it was sent, it trained
                m.update({"train_s": (0.5 if msg.metadata.dst_node_id == 101 else 0.01) * int(m["steps"]),
                          "libs_s": 0.1, "data_s": 0.1, "model_s": 0.1, "reply_s": 0.1})
            replies.append(reply)
        CA._KEPT.clear()
        _, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics["merged_heads"] == 2
        sent_steps.append(steps)
        assert [p["steps"] for p in strategy.placement] == [steps[100], steps[101]]
    assert sent_steps[0] == sent_steps[1] == {100: 4, 101: 4}  # nothing measured yet, then only start-up
    assert sent_steps[2] == ({100: 4, 101: 2} if deadline_steps == "fit" else {100: 4, 101: 4})
    # the 2 steps not sent, of 4 samples each (batch 8 over 2 heads), do not count as seen
    assert strategy.skipped_samples == (2 * 4 if deadline_steps == "fit" else 0)


def test_a_damaged_state_file_falls_back_to_the_servers_copy_where_the_server_sent_one(tmp_path):
    """After a server restart ("local-or-restore"), a node whose saved state cannot be read (cut
    short by a crash or a full disk) trains the head from the server's copy, as if the file were
    lost; where the server sent no copy ("local"), the error names the file."""
    from flwr.app import Context, RecordDict

    import clients.client_app as CA
    from lte_fed.lte import StackedLTE

    s = spec(lte={"heads": 2, "rank": 4})
    model = StackedLTE(setup(s).plain, lte_config(s), [0], [4])
    store = CA.StateFiles(Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {}), s, "run1", "head-0")
    restore = {k: torch.full_like(t, 0.5) for k, t in model.head_state(0).items()}
    store.save(model.head_state(0), {}, rnd=3, keep_from=0)
    store._file(3).write_bytes(store._file(3).read_bytes()[:100])  # cut short
    with pytest.raises(ValueError, match=r"head-0-r3\.safetensors: not a readable state file"):
        CA._load_head(model, 0, store, "local", True, restore, 3)
    opt, resid, lost = CA._load_head(model, 0, store, "local-or-restore", True, restore, 3)
    assert opt is None and resid == {}  # AdamW anew, as for a lost file
    assert "not a readable state file" in lost  # the reply says so (P.STATE_LOST), the server logs it
    assert all(torch.equal(model.head_state(0)[k], restore[k]) for k in restore)


@pytest.mark.parametrize("whose", ["head", "round", "run"])
def test_a_state_file_of_another_head_round_or_run_is_not_taken_for_this_ones(tmp_path, whose):
    """A file copied onto a head's state file name (another head's, an older round's, another
    run's) was loaded as that head's state, and the run went on from it without a word."""
    from flwr.app import Context, RecordDict

    import clients.client_app as CA
    from lte_fed.lte import StackedLTE

    s = spec(lte={"heads": 2, "rank": 4})
    model = StackedLTE(setup(s).plain, lte_config(s), [0], [4])
    ctx = Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {})
    mine = CA.StateFiles(ctx, s, "run1", "head-1")
    other = CA.StateFiles(ctx, s, "run2" if whose == "run" else "run1", "head-0" if whose == "head" else "head-1")
    other.save(model.head_state(0), {}, rnd=2 if whose == "round" else 3, keep_from=0)
    mine.dir.mkdir(parents=True, exist_ok=True)
    mine._file(3).write_bytes(other._file(2 if whose == "round" else 3).read_bytes())
    with pytest.raises(ValueError, match=rf"head-1-r3\.safetensors: holds the state of {'name' if whose == 'head' else 'round' if whose == 'round' else 'run_id'}"):
        mine.load(3)
    restore = {k: torch.full_like(t, 0.5) for k, t in model.head_state(0).items()}
    assert CA._load_head(model, 0, mine, "local-or-restore", True, restore, 3)[2]  # the server's copy, said


def test_a_state_dir_that_cannot_be_a_folder_is_named(tmp_path):
    from flwr.app import Context, RecordDict

    import clients.client_app as CA

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CA.ClientConfigError, match=r"state dir .*a-file: cannot keep this node's state there"):
        CA.StateFiles(Context(1, 1, {"state-dir": str(tmp_path / "a-file")}, RecordDict(), {}), spec(), "run1", "head-0")


def test_what_someone_put_in_a_state_dir_breaks_no_save_and_the_shard_cache_only_costs_a_rebuild(tmp_path):
    """A folder named like an old state file made every later save fail (its clean-up unlinked
    it); a file named like the shard cache's folder failed every message; a save onto a folder
    left its .tmp behind and did not say which file."""
    from flwr.app import Context, RecordDict

    import clients.client_app as CA

    store = CA.StateFiles(Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {}), spec(), "run1", "head-1")
    store._file(0).mkdir()  # named like round 0's state, which round 2's save removes
    head, opt = {"a": torch.ones(2, 3)}, {"0.step": torch.tensor(1.0)}
    store.save(head, opt, rnd=2, keep_from=2)
    assert torch.equal(store.load(2)["head.a"], head["a"]) and store._file(0).is_dir()
    store._file(3).mkdir()
    with pytest.raises(OSError, match=r"head-1-r3.safetensors: cannot save this node's state there"):
        store.save(head, opt, rnd=3, keep_from=2)
    assert not store._file(3).with_suffix(".tmp").exists()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / W.SHARDS).write_text("not a folder")
    job, _ = W.node_data(spec(), 1, tmp_path / "cache")  # built, not cached: the message goes on
    assert len(job.data.train_y) > 0


def test_a_node_whose_copy_of_the_data_is_not_the_servers_is_refused(tmp_path):
    """A node given another data-root (the same class folders, other labels) trained on it and
    was merged without a word; now its message fails, naming the cause."""
    from clients.client_app import ClientConfigError, _same_data

    s = spec()
    server = setup(s)
    for cache in (tmp_path, tmp_path):  # the shard built, then read back from the node's cache
        _same_data({"data_id": server.data_id}, W.node_data(s, 1, cache)[0])
    other = W.node_data(spec(data={"synthetic_size": 97}), 1, tmp_path)[0]
    with pytest.raises(ClientConfigError, match="this node's data differs from the server's"):
        _same_data({"data_id": server.data_id}, other)


def test_a_node_restarted_declaring_fewer_heads_gets_fewer_from_its_next_reply_on(tmp_path):
    """Node 1 answers round 1, restarts (same key, same node id) with node config heads=1: the
    server had no reason to ask it again, and sent it its old share every round. Its reply to
    round 2 says so now, and round 3 places by it."""
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.client_app as CA

    s = spec(lte={"heads": 4, "merge_every": 2}, train={"batch_size": 8, "steps": 6},
             run={"engine": "flower", "out": str(tmp_path / "run")})
    grid = _TwoNodes(s, tmp_path)
    shares = []
    for rnd in (1, 2, 3):
        replies = []
        for i, msg in enumerate(grid.strategy.configure_train(rnd, None, ConfigRecord(), grid)):
            msg.metadata.__dict__["_message_id"] = f"down-{rnd}-{i}"
            reply = CA.train(msg, grid.contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_message_id"] = f"up-{rnd}-{i}"
            replies.append(reply)
        if rnd == 1:  # node 1 restarts between its answer to round 1 and round 2's message
            grid.contexts[101] = Context(1, 101, {"partition-id": 1, "heads": 1}, RecordDict(), {})
        assert grid.strategy.aggregate_train(rnd, replies)[1]["merged_heads"] == 4
        shares.append({p["node"]: len(p["heads"]) for p in grid.strategy.placement})
    CA._KEPT.clear()
    assert shares[:2] == [{0: 2, 1: 2}] * 2, shares  # as first declared (nothing: an even share)
    assert shares[2] == {0: 3, 1: 1}, shares  # node 1's reply to round 2 declared heads=1


def test_heads_that_wait_for_room_are_not_counted_as_trained_and_a_fleet_that_holds_too_few_is_refused(tmp_path):
    """`samples` counted every head every round, sent or not: two nodes of one head each and four
    heads reported twice the samples trained. A simulated fleet whose memory holds fewer heads
    than the run has ran every round with the rest waiting."""
    import dataclasses

    from flwr.app import ConfigRecord

    s = spec(lte={"heads": 4, "merge_every": 2}, train={"batch_size": 8, "steps": 4},
             run={"engine": "flower", "out": str(tmp_path / "run")})
    grid = _TwoNodes(s, tmp_path)
    for node, info in grid.strategy.partitions.info.items():
        grid.strategy.partitions.info[node] = dataclasses.replace(info, heads=1)
    msgs = list(grid.strategy.configure_train(1, None, ConfigRecord(), grid))
    assert sum(len(m.content["config"]["heads"]) for m in msgs) == 2
    assert grid.strategy.skipped_samples == 2 * 2 * (8 // 4)  # 2 heads waited, 2 steps of 2 samples each

    s = spec(lte={"heads": 4}, run={"engine": "flower", "out": str(tmp_path / "run2"),
                                    "fleet": "memory-gb=0.00001;memory-gb=0.00001"})
    fleet = _TwoNodes(s, tmp_path)
    with pytest.raises(SpecError, match="run.fleet: its nodes hold 0 head"):
        fleet.strategy.wait_for_workers(fleet, 5.0)
