"""Nodes that host several heads (lte_fed/node.py, lte_fed/placement.py): a node's stacked heads
are the fused engine's heads of the same ids, any placement of heads on nodes merges to the fused
engine's weights, and the server places heads by capacity, keeping each where its state is."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lte_fed.engine import FusedRun
from lte_fed.job import batch_source, lte_config, setup
from lte_fed.ledger import HeadLedger, RoundMerge
from lte_fed.lora import head_scale
from lte_fed.lte import HeadLTE, StackedLTE
from lte_fed.node import head_optimizer_state, load_head_optimizer_states, train_heads
from lte_fed.placement import NodeInfo, assign, by_node, capacities
from lte_fed.train import lr_at, make_optimizer, train_head

from .helpers import quick_spec


# ------------------------------------------------------------------------------ placement
def test_undeclared_nodes_share_the_heads_evenly_in_partition_order():
    nodes = [NodeInfo(11, 1), NodeInfo(10, 0), NodeInfo(12, 2)]
    placed = by_node(assign(8, nodes, {}))
    assert placed == {10: [0, 1, 2], 11: [3, 4, 5], 12: [6, 7]}


def test_declared_capacity_is_filled_and_the_rest_is_shared():
    nodes = [NodeInfo(10, 0, heads=5), NodeInfo(11, 1), NodeInfo(12, 2, heads=1)]
    assert capacities(nodes, 8) == {10: 5, 11: 2, 12: 1}
    assert by_node(assign(8, nodes, {})) == {10: [0, 1, 2, 3, 4], 11: [5, 6], 12: [7]}


def test_heads_stay_with_their_state_and_a_gone_nodes_heads_move_where_there_is_room():
    nodes = [NodeInfo(10, 0), NodeInfo(11, 1)]
    holders = {0: 11, 1: 11, 2: 10, 3: 10}  # placed otherwise than the fill order would
    assert assign(4, nodes, holders) == holders
    # node 11 is gone: its heads go to the one left (an undeclared node takes what is left)
    assert assign(4, [NodeInfo(10, 0)], holders) == {0: 10, 1: 10, 2: 10, 3: 10}


def test_a_declared_capacity_is_never_exceeded_heads_wait_instead():
    nodes = [NodeInfo(10, 0, heads=2), NodeInfo(11, 1, heads=1)]
    out = assign(4, nodes, {3: 11})
    assert out == {3: 11, 0: 10, 1: 10} or out == {0: 10, 1: 10, 3: 11}
    assert 2 not in out


# ------------------------------------------------------------------------- stacked subsets
def test_a_nodes_heads_start_as_the_fused_engines_heads_of_the_same_ids():
    spec = quick_spec("lte", lte={"heads": 6}, train={"batch_size": 12})
    job = setup(spec)
    fused = StackedLTE(job.plain, lte_config(spec))
    node = StackedLTE(job.plain, lte_config(spec), [4, 1])
    for i, h in enumerate(node.head_ids):
        a, b = node.head_state(i, with_corr=True), fused.head_state(h, with_corr=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one = HeadLTE(job.plain, lte_config(spec), 4).head_state()
    assert all(torch.equal(one[k], node.head_state(0)[k]) for k in one)
    with pytest.raises(ValueError, match="distinct"):
        StackedLTE(job.plain, lte_config(spec), [1, 1])
    with pytest.raises(ValueError, match="0..5"):
        StackedLTE(job.plain, lte_config(spec), [6])


def _node_round(spec, job, src, ledger, W, replicas, rnd, groups, models, opts, ranks):
    """One round with the heads split into `groups` (one node each): load, train stacked, merge."""
    T, cfg = spec.merge_every, lte_config(spec)
    scales = {h: head_scale(cfg.alpha, ranks[h], cfg.rank, cfg.rank_scale) for h in range(len(ranks))}
    layouts = {h: {k: (tuple(t.shape), t.dtype) for k, t in ledger[h].state.items() if ".corr_" not in k}
               for h in range(len(ranks))}
    merge = RoundMerge(rnd, ledger, W, replicas, layouts[0], scale=scales, variant=spec.lte.variant,
                       layouts=layouts)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    for g, heads in enumerate(groups):
        model, opt = models[g], opts[g]
        for i, h in enumerate(heads):
            if ledger[h].committed:
                model.commit_head(i)
            merge.expect(h, g)
        model.load_base_state({f"{n}.base.weight": w for n, w in W.items()})
        model.load_replicas(replicas)
        losses = train_heads(model, opt, src, (rnd - 1) * T, T, lr=lr, clip=spec.train.clip, device=job.device)
        for i, h in enumerate(heads):
            merge.got[h] = (g, {k: t.clone() for k, t in model.head_state(i).items()}, losses[-1][i])
    result = merge.close()
    assert result.merged == sorted(h for grp in groups for h in grp)


def _fused(spec, job, src, ranks):
    """The fused engine's computation (every head stacked, merged in place) at `ranks`."""
    model = StackedLTE(job.plain, lte_config(spec), ranks=ranks)
    opt = make_optimizer(model.head_params(), spec.lr, spec.train.weight_decay)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    for rnd in range(spec.train.steps // spec.merge_every):
        train_heads(model, opt, src, rnd * spec.merge_every, spec.merge_every, lr=lr, clip=spec.train.clip,
                    device=job.device)
        model.merge()
    return model.plain_state()


@pytest.mark.parametrize("groups, ranks", [
    ([[0, 1, 2, 3]], [4, 4, 4, 4]), ([[0, 1], [2, 3]], [4, 4, 4, 4]), ([[3], [0, 2], [1]], [4, 4, 4, 4]),
    ([[0, 1, 2, 3]], [2, 4, 8, 16]), ([[3], [0, 2], [1]], [2, 4, 8, 16])])
def test_any_placement_of_heads_on_nodes_merges_to_the_fused_engines_weights(tmp_path, groups, ranks):
    spec = quick_spec("lte", lte={"heads": 4, "merge_every": 2}, train={"steps": 6})
    job = setup(spec)
    src = batch_source(job)
    cfg = lte_config(spec)
    if ranks == [4] * 4:  # the fused engine itself
        fused = FusedRun(spec, tmp_path / "fused")
        for _ in range(spec.train.steps // spec.merge_every):
            for _ in range(spec.merge_every):
                fused.train_step()
            fused.model.merge()
        want = fused.model.plain_state()
    else:  # heads of mixed rank, zero-padded to the largest in one stacked model
        want = _fused(spec, job, src, ranks)
    ledger = HeadLedger([HeadLTE(job.plain, dataclasses.replace(cfg, rank=r), n).head_state(with_corr=True)
                         for n, r in enumerate(ranks)])
    server = StackedLTE(job.plain, cfg)
    W = {n: l.weight.clone() for n, l in server.lora_layers().items()}
    replicas = {n: p[0].detach().reshape(server.plan.replicas[n]).clone() for n, p in server.replica_params().items()}
    models = [StackedLTE(job.plain, cfg, heads, [ranks[h] for h in heads]) for heads in groups]
    opts = [make_optimizer(m.head_params(), spec.lr, spec.train.weight_decay) for m in models]
    for rnd in range(1, spec.train.steps // spec.merge_every + 1):
        _node_round(spec, job, src, ledger, W, replicas, rnd, groups, models, opts, ranks)
    for n, w in W.items():
        assert torch.allclose(w, want[f"{n}.weight"], atol=1e-5), n
    for n, r in replicas.items():
        assert torch.allclose(r, want[n], atol=1e-5), n


def test_heads_of_other_ranks_are_scaled_by_the_square_root_rule():
    assert head_scale(32.0, 4, 4) == 8.0 and head_scale(32.0, 16, 4, "linear") == 2.0
    assert head_scale(32.0, 16, 4) == 4.0 and head_scale(32.0, 1, 4) == 16.0


@pytest.mark.parametrize("method", ["lte", "full"])
def test_every_training_loop_drops_the_gradients_once_the_optimizer_has_stepped(tmp_path, method):
    """Gradients must not outlive their step: the next forward's activations would pile up on
    top of them (for full training, a whole second copy of the model), which the memory
    estimate does not count (lte_fed/memory.py)."""
    spec = quick_spec(method, lte={"heads": 2}, train={"batch_size": 8})
    job = setup(spec)
    src = batch_source(job)
    run = FusedRun(spec, tmp_path / "fused")
    run.train_step()
    assert all(p.grad is None for p in run.params) and run.opt.state  # it did step
    if method == "full":
        return
    model = StackedLTE(job.plain, lte_config(spec), [0, 1])
    opt = make_optimizer(model.head_params(), 1e-3, 0.0)
    train_heads(model, opt, src, 0, 2, lr=lambda s: 1e-3, clip=1.0, device=job.device)
    assert all(p.grad is None for p in model.head_params()) and opt.state
    head = HeadLTE(job.plain, lte_config(spec), 0)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-3, 0.0)
    train_head(head, opt, src, 0, 0, 2, lr=lambda s: 1e-3, clip=1.0, device=job.device)
    assert all(p.grad is None for p in params) and opt.state


def test_optimizer_state_travels_per_head():
    spec = quick_spec("lte", lte={"heads": 3}, train={"batch_size": 12})
    job = setup(spec)
    src = batch_source(job)
    model = StackedLTE(job.plain, lte_config(spec), [0, 1, 2])
    opt = make_optimizer(model.head_params(), 1e-3, 0.0)
    train_heads(model, opt, src, 0, 2, lr=lambda s: 1e-3, clip=1.0, device=job.device)
    per_head = [head_optimizer_state(opt, i) for i in range(3)]
    # the same heads on another node, in another order, one of them without state (restored)
    other = StackedLTE(job.plain, lte_config(spec), [2, 0, 1])
    opt2 = make_optimizer(other.head_params(), 1e-3, 0.0)
    load_head_optimizer_states(opt2, other.head_params(), [per_head[2], per_head[0], None])
    for i, h in enumerate([2, 0]):
        got = head_optimizer_state(opt2, i)
        assert got.keys() == per_head[h].keys() and all(torch.equal(got[k], per_head[h][k]) for k in got)
    fresh = head_optimizer_state(opt2, 2)
    assert all(float(t.abs().sum()) == 0 for k, t in fresh.items() if not k.endswith("step"))


# --------------------------------------------------------------------- partial rounds, deadline
def test_a_partial_round_divides_by_the_heads_that_arrived_or_by_all():
    spec = quick_spec("lte", lte={"heads": 4})
    job = setup(spec)
    cfg = lte_config(spec)
    server = StackedLTE(job.plain, cfg)
    g = torch.Generator().manual_seed(0)
    moved = {}
    for partial in ("arrived", "all"):
        ledger = HeadLedger([HeadLTE(job.plain, cfg, n).head_state(with_corr=True) for n in range(4)])
        W = {n: l.weight.clone() for n, l in server.lora_layers().items()}
        W0 = {n: w.clone() for n, w in W.items()}
        replicas = {n: p[0].detach().reshape(server.plan.replicas[n]).clone() for n, p in server.replica_params().items()}
        layout = {k: (tuple(t.shape), t.dtype) for k, t in ledger[0].state.items() if ".corr_" not in k}
        merge = RoundMerge(1, ledger, W, replicas, layout, scale=cfg.scale, variant="exact", partial=partial)
        g.manual_seed(0)
        for h in range(4):
            merge.expect(h, h)
        for h in (0, 2):  # heads 1 and 3 are late
            state = {k: t + 0.01 * torch.randn(t.shape, generator=g) if k.endswith("lora_B") else t.clone()
                     for k, t in ledger[h].state.items() if ".corr_" not in k}
            merge.got[h] = (h, state, 1.0)
        assert merge.close().merged == [0, 2]
        moved[partial] = {n: W[n] - W0[n] for n in W}
        assert ledger[1].holder is None and ledger[3].holder is None  # late: restart from the server's state
    for n, d in moved["arrived"].items():
        assert float(d.abs().max()) > 0
        assert torch.allclose(moved["all"][n], d * 2 / 4, atol=1e-7)


def test_the_round_deadline_spares_the_servers_first_round():
    from strategies.rounds import round_wait

    spec = quick_spec("lte", "flower", run={"round_deadline": 5.0, "round_timeout": 60.0})
    assert round_wait(spec, 1, first=1) == 60.0 and round_wait(spec, 2, first=1) == 5.0
    assert round_wait(spec, 4, first=4) == 60.0  # a resumed server's first round
    assert round_wait(quick_spec("lte", "flower"), 2, first=1) == 600.0


def test_a_partial_round_of_mixed_ranks_through_int8_and_nesterov_damps_before_the_outer_step():
    """The merged issues together: heads of ranks 2 and 8 reply int8 changes (each decoded at its
    own layout), only 2 of 4 arrive under run.partial_merge=all, and the outer step is taken on
    the damped update (share · Δ), committed with the merge."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from lte_fed import protocol as P
    from lte_fed.lora import merge_update_heads
    from lte_fed.outer import OuterConfig, OuterOptimizer, outer_update
    from lte_fed.uplink import ef_step, reconstruct

    spec = quick_spec("lte", lte={"heads": 4, "variant": "exact"})
    job = setup(spec)
    cfg = lte_config(spec)
    ranks = [2, 4, 8, 4]
    ledger = HeadLedger([HeadLTE(job.plain, dataclasses.replace(cfg, quant="none", rank=r), n).head_state(with_corr=True)
                         for n, r in enumerate(ranks)])
    server = StackedLTE(job.plain, cfg)
    W = {n: l.weight.clone() for n, l in server.lora_layers().items()}
    W0 = {n: w.clone() for n, w in W.items()}
    replicas = {n: p[0].detach().reshape(server.plan.replicas[n]).clone() for n, p in server.replica_params().items()}
    R0 = {n: r.clone() for n, r in replicas.items()}
    layouts = {h: P.expected_head_layout(ledger[h].state) for h in range(4)}
    scales = {h: head_scale(cfg.alpha, r, cfg.rank, cfg.rank_scale) for h, r in enumerate(ranks)}
    ocfg = OuterConfig("nesterov", lr=0.7, momentum=0.9)
    outer = OuterOptimizer(ocfg)
    merge = RoundMerge(1, ledger, W, replicas, layouts[0], scale=scales, variant="exact", layouts=layouts,
                       partial="all", outer=outer, uplink="int8")
    g = torch.Generator().manual_seed(0)
    for h in range(4):
        merge.expect(h, h)
    got = {}
    for h in (0, 2):  # ranks 2 and 8; heads 1 and 3 are late
        start = {k: t for k, t in ledger[h].state.items() if ".corr_" not in k}
        end = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in start.items()}
        wire, _ = ef_step(end, start, {}, "int8")
        content = RecordDict({P.head_record(h): ArrayRecord(P.wire(wire)),
                              P.metrics_record(h): MetricRecord({"head": h, "train_loss": 1.0})})
        assert merge.receive(h, content, arrays=P.head_record(h), metrics=P.metrics_record(h)) is None
        got[h] = reconstruct(ledger[h].state, wire, "int8", layouts[h])
    corr = {h: {k: t.clone() for k, t in ledger[h].state.items() if ".corr_" in k} for h in (0, 2)}
    assert merge.close().merged == [0, 2]
    share = 2 / 4
    for n in W:
        delta = merge_update_heads([(got[h][f"{n}.lora_B"], got[h][f"{n}.lora_A"], corr[h][f"{n}.corr_B"],
                                     corr[h][f"{n}.corr_A"], scales[h]) for h in (0, 2)])
        step, _ = outer_update(delta * share, {}, ocfg)
        assert torch.allclose(W[n], W0[n] + step, atol=1e-6), n
        assert torch.allclose(outer.state[n]["m"], delta * share, atol=1e-7)  # committed
    for n, r in replicas.items():
        damped = R0[n] + share * (torch.stack([got[h][n] for h in (0, 2)]).mean(0) - R0[n])
        d = damped - R0[n]
        assert torch.allclose(r, damped + (outer_update(d, {}, ocfg)[0] - d), atol=1e-6), n


@pytest.mark.parametrize("variant, ranks", [("exact", None), ("reset", [2, 4, 8])])
def test_a_slice_reset_to_another_head_is_that_head_as_built(variant, ranks):
    """A kept node model (clients/client_app.py) is retargeted with `reset_head`: the slice must
    be exactly what a fresh build for that head holds: A drawn from (seed, head), B and V zero."""
    spec = quick_spec("lte", lte={"heads": 6, "variant": variant}, train={"batch_size": 12})
    job = setup(spec)
    cfg = lte_config(spec)
    kept = StackedLTE(job.plain, cfg, [0, 1, 2], ranks)
    with torch.no_grad():  # as after training: every factor moved
        for l in kept.lora_layers().values():
            for t in (l.lora_A, l.lora_B, *((l.corr_A, l.corr_B) if l.corr_A is not None else ())):
                t.add_(1.0)
    kept.reset_head(1, 5)
    kept.reset_head(2, 3, draw=False)  # A is left for a load to overwrite
    fresh = StackedLTE(job.plain, cfg, [0, 5, 4], ranks)
    assert kept.head_ids == [0, 5, 3]
    a, b = kept.head_state(1, with_corr=True), fresh.head_state(1, with_corr=True)
    assert a.keys() == b.keys()
    lora = [k for k in a if ".lora_" in k or ".corr_" in k]
    assert lora and all(torch.equal(a[k], b[k]) for k in lora)
    moved = kept.head_state(0, with_corr=True)
    assert not torch.equal(moved[lora[0]], fresh.head_state(0, with_corr=True)[lora[0]])  # slice 0 untouched
    kept2 = kept.head_state(2, with_corr=True)
    assert all(not kept2[k].any() for k in lora if not k.endswith("lora_A"))


def test_a_node_gets_the_steps_that_fit_in_its_share_of_the_deadline():
    from lte_fed.placement import steps_that_fit

    assert steps_that_fit(10, 0.0, 1.0) == 10  # no deadline
    assert steps_that_fit(10, 1.0, None) == 10  # not measured yet
    assert steps_that_fit(10, 1.0, 0.05, 0.2) == 10  # 0.7 s fits in 0.8 s
    assert steps_that_fit(10, 1.0, 0.15, 0.1) == 4  # (0.8 - 0.1) / 0.15
    assert steps_that_fit(10, 1.0, 2.0, 0.1) == 1  # not even one fits: one step, never none
    assert steps_that_fit(10, 1.0, 0.1, 5.0) == 1
