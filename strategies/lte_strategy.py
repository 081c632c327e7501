"""LTEStrategy: LoRA-the-Explorer as a Flower strategy (the server side of one LTE round).

The server holds the full-precision base W, the merged replicas and the head ledger
(lte_fed/ledger.py). Each round it places the heads on the nodes by their capacity
(lte_fed/placement.py: a head stays where its state is; when its node is gone it moves to a node
with room, with its state from the server), sends each node one message with q(W) and all its
heads, and merges what came back through `RoundMerge`: every head of every reply is screened by
the protocol gate and the update-size guard, the merge is checked finite before it is committed, and a rejected head
falls back to the server's copy.

How a worker gets a head's state ("source" in the message config):
    fresh             never trained: draw its init from (seed, head)
    local             the node holds the head's latest state (it trained it last round)
    restore           take the RESTORE record (the head as of its last merge)
    local-or-restore  after a server restart: the node's own saved state of the checkpointed
                      round if it has one (exact, AdamW included), else RESTORE
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from lte_fed import protocol as P
from lte_fed import quant
from lte_fed.convert import to_original_state
from lte_fed.costs import message_wall_s
from lte_fed.job import Job, lte_config
from lte_fed.ledger import Guard, HeadLedger, RoundMerge
from lte_fed.lora import head_scale
from lte_fed.lte import HeadLTE, plan
from lte_fed.outer import OuterOptimizer, outer_config
from lte_fed.placement import NodeInfo, by_node, steps_that_fit
from lte_fed.rundir import RunDir, check_tensors_fit, checkpoint_meta, open_resume, restoring
from lte_fed.spec import Spec, SpecError, parse_fleet
from lte_fed.train import head_alignment, prefixed, unprefixed

from .grid_utils import PartitionMap, message_bytes, reply_bytes, wait_for_capacity, worker_costs
from .rounds import RoundLoop

PACE_ANSWERS = 4  # a node's pace under run.deadline_steps=fit: the slowest of its last 4 answers

log = logging.getLogger("lte_fed.server")


class LTEStrategy(RoundLoop):
    def __init__(self, spec: Spec, job: Job, out: str | Path):
        self.spec, self.job, self.dir = spec, job, RunDir(out)
        self.cfg = lte_config(spec)
        prepared = copy.deepcopy(job.plain)
        self.plan = plan(prepared, self.cfg.keep_norm_affine)
        self.W = {n: prepared.get_submodule(n).weight.detach().float().clone() for n in self.plan.lora}
        self.replicas = {n: prepared.get_parameter(n).detach().float().clone() for n in self.plan.replicas}
        del prepared
        init_cfg = dataclasses.replace(self.cfg, quant="none")  # only the factors are needed
        self.ledger = HeadLedger([HeadLTE(job.plain, init_cfg, n).head_state(with_corr=True)
                                  for n in range(self.cfg.heads)])
        self.layout = P.expected_head_layout(self.ledger[0].state)
        self.guard = Guard(spec.run.max_update_ratio, spec.run.max_update_outlier)
        self.outer = None if outer_config(spec).is_avg else OuterOptimizer(outer_config(spec))  # lte.outer
        self.partitions = PartitionMap(check=self._check_node)
        self.run_id, self.round, self.wall, self.checkpointed = uuid.uuid4().hex[:16], 0, 0.0, 0
        self.trust_local: set[int] = set()  # after a resume: heads whose node may hold their state
        self._round: RoundMerge | None = None
        self._sent: list[Message] = []  # this round's messages
        self.bytes_up = self.bytes_down = 0
        self.round_loss, self.alignment = float("nan"), {}
        self.costs: dict[int, dict] = {}  # head -> what its message cost the worker (lte_fed/costs.py)
        self.placement: list[dict] = []  # this round's: [{"node": partition-id, "heads": [...], "ranks": [...]}]
        self.merged_now: list[int] = []  # the heads this round merged
        self._shape = None  # the model's shape for the memory estimate (memory-gb nodes), built once
        self._too_small: set[int] = set()  # memory-gb nodes that hold no head (logged once)
        self.pace: dict[int, list[tuple[float, float]]] = {}  # node -> its last PACE_ANSWERS (s per step, s of the rest)

    def summary(self) -> None:
        c = self.cfg
        log.info("LTEStrategy: %d heads, rank %d, alpha %g, T=%d, %s variant, base %s, min_heads %d",
                 c.heads, c.rank, c.alpha, self.spec.merge_every, c.variant, c.quant, self.spec.run.min_heads)

    # ------------------------------------------------------------------ one round
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        s = self.spec
        start = (server_round - 1) * s.merge_every
        steps = min(s.merge_every, s.train.steps - start)
        base, replicas = ArrayRecord(P.pack_wire(self.quantized_base())), ArrayRecord(P.pack_wire(self.replicas))
        spec_json = P.spec_to_json(s.to_dict())
        alive = self.free_nodes(grid)  # a busy node's heads go where there is room
        self._fleet()
        holders = {h: self.ledger[h].holder for h in range(self.cfg.heads)}
        assignment = self.partitions.assign(self.cfg.heads, alive, holders, self._declared(self.partitions.nodes(alive)))
        for h, node in assignment.items():
            self._settle_rank(h, self.partitions.info[node].rank or self.cfg.rank)
        heads = range(self.cfg.heads)
        self._round = RoundMerge(server_round, self.ledger, self.W, self.replicas, self.layout,
                                 scale={h: self.scale_of(h) for h in heads}, variant=self.cfg.variant,
                                 guard=self.guard, partial=self.spec.run.partial_merge,
                                 layouts={h: P.expected_head_layout(self.ledger[h].state) for h in heads},
                                 outer=self.outer, uplink=s.comm.up)
        placed = by_node(assignment)
        node_steps = {node: self._steps_for(node, steps) for node in placed}
        per_head_batch = s.train.batch_size // self.cfg.heads
        self.skipped_samples += sum((steps - node_steps[n]) * per_head_batch * len(hs) for n, hs in placed.items())
        self.skipped_samples += (self.cfg.heads - len(assignment)) * steps * per_head_batch  # heads that wait
        msgs = [self._train_message(server_round, node, heads, base, replicas, spec_json, start, node_steps[node])
                for node, heads in placed.items()]
        for head in sorted(set(range(self.cfg.heads)) - set(self._round.sent)):
            log.warning("round %d: no node has room for head %d; it waits", server_round, head)
        self.placement = [{"node": self.partitions.info[node].partition, "heads": heads,
                           "ranks": [self.rank_of(h) for h in heads], "steps": node_steps[node]}
                          for node, heads in placed.items()]
        self.trust_local = set()
        self.bytes_down = sum(message_bytes(m) for m in msgs)
        self._sent = msgs
        return msgs

    def _train_message(self, rnd: int, node: int, heads: list[int], base: ArrayRecord, replicas: ArrayRecord,
                       spec_json: str, start: int, steps: int) -> Message:
        """One node's TRAIN message: q(W) and the replicas once, every head's source, and the
        server's state of the heads it must take over (protocol.py)."""
        content, restore = {P.BASE: base, P.REPLICAS: replicas}, {}
        sources = [self._source(h, node) for h in heads]
        for h, source in zip(heads, sources):
            if source in ("restore", "local-or-restore"):
                restore |= prefixed(str(h), self.ledger[h].state)
            if source == "restore" and rnd > 1:
                log.warning("round %d: head %d goes to node %d with its state from the server", rnd, h, node)
            self._round.expect(h, node)
        if restore:
            content[P.RESTORE] = ArrayRecord(P.pack_wire(restore))
        content[P.CONFIG] = ConfigRecord({
            "heads": heads, "ranks": [self.rank_of(h) for h in heads], "sources": sources,
            "committed": [self.ledger[h].committed for h in heads],
            "start_step": start, "steps": steps, "round": rnd, "spec": spec_json, "run_id": self.run_id,
            "state_round": rnd - 1, "keep_from": self.checkpointed, "data_id": self.job.data_id,
        })
        return Message(RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN)

    def _steps_for(self, node: int, steps: int) -> int:
        """The round's local steps for `node`: all T, or with run.deadline_steps=fit under a
        deadline, what fits at its pace (placement.steps_that_fit)."""
        if self.spec.run.deadline_steps != "fit" or not self.spec.run.round_deadline or node not in self.pace:
            return steps
        # the slowest of its last answers: on a shared machine one fast answer is not a promise
        step_s, other_s = (max(p[i] for p in self.pace[node]) for i in (0, 1))
        fit = steps_that_fit(steps, self.spec.run.round_deadline, step_s, other_s)
        if fit < steps:
            log.info("node of partition %d: %d of %d steps fit in the deadline at its pace (%.3f s a step)",
                     self.partitions.info[node].partition, fit, steps, step_s)
        return fit

    def _note_pace(self, reply: Message, arrival_s: float | None = None) -> None:
        """Remember a node's seconds per step and the rest of its round trip: with `arrival_s`
        (seconds from the push to its reply: an answer in time), everything but its training,
        Flower's messaging included; else (a late answer) its message's wall time outside
        training (costs.message_wall_s)."""
        if reply.has_error():
            return
        for name, m in reply.content.metric_records.items():
            steps = int(m.get("steps", 0)) if name.startswith(P.METRICS) else 0
            if steps > 0 and "train_s" in m:
                train_s = float(m["train_s"])
                other = message_wall_s(m) - train_s
                if arrival_s is not None:
                    other = max(other, arrival_s - train_s)
                seen = self.pace.setdefault(reply.metadata.src_node_id, [])
                seen[:] = [*seen, (train_s / steps, other)][-PACE_ANSWERS:]
                return

    def heard_late(self, replies: list) -> None:
        for reply in replies:
            self._note_pace(reply)

    # ------------------------------------------------------------------ ranks and capacity
    def param_counts(self) -> dict[str, int]:
        """summary.json's "params", as the fused engine counts them (lte_fed/lte.py `accounting`):
        every head's factors and its replicas, and the base (m·n per LoRA layer)."""
        counts = {"lora": 0, "replica": 0, "unaccounted": 0, "base": sum(w.numel() for w in self.W.values())}
        for h in range(self.cfg.heads):
            for name, t in self.ledger[h].state.items():
                if name.endswith((".lora_A", ".lora_B")):
                    counts["lora"] += t.numel()
                elif name in self.replicas:
                    counts["replica"] += t.numel()
        return counts

    def rank_of(self, head: int) -> int:
        return int(self.ledger[head].state[f"{self.plan.lora[0]}.lora_A"].shape[0])

    def scale_of(self, head: int) -> float:
        return head_scale(self.cfg.alpha, self.rank_of(head), self.cfg.rank, self.cfg.rank_scale)

    def _check_node(self, info) -> str | None:
        """Why a node's declaration cannot be used, or None: a rank above every LoRA layer's
        min(out, in) buys nothing, and a huge one would allocate its factors here and on the node."""
        top = max(min(w.shape) for w in self.W.values())
        if info.rank > top:
            return (f"partition {info.partition} declares rank {info.rank}, above every LoRA layer's min(out, in) "
                    f"(at most {top}): declare rank <= {top} (node config rank, or its run.fleet entry)")
        return None

    def _settle_rank(self, head: int, rank: int) -> None:
        """A head takes the rank of the node it first trains on (node config `rank`, else
        lte.rank) and keeps it: a node of another rank trains it zero-padded or as it is."""
        if self.ledger[head].fresh and self.rank_of(head) != rank:
            cfg = dataclasses.replace(self.cfg, quant="none", rank=rank)
            self.ledger[head].state = {k: t.detach().float().clone()
                                       for k, t in HeadLTE(self.job.plain, cfg, head).head_state(with_corr=True).items()}

    def _fleet(self) -> None:
        """run.fleet (simulation): each simulated node declares what its entry says."""
        if not self.spec.run.fleet:
            return
        fleet = parse_fleet(self.spec.run.fleet)
        for node, info in list(self.partitions.info.items()):
            if info.partition < len(fleet) and not (info.heads or info.rank or info.memory_gb):
                e = fleet[info.partition]
                self.partitions.info[node] = dataclasses.replace(
                    info, heads=int(e.get("heads", 0)), rank=int(e.get("rank", 0)), memory_gb=float(e.get("memory-gb", 0)))
                if why := self._check_node(self.partitions.info[node]):
                    raise SpecError(f"run.fleet: {why}")

    def _declared(self, infos: list[NodeInfo]) -> dict[int, int]:
        """node -> heads it can carry, for nodes that declared `memory-gb` but not `heads`
        (the memory estimate at the node's rank and the run's per-head batch)."""
        out = {}
        for info in infos:
            if info.heads or not info.memory_gb:
                continue
            from lte_fed.memory import heads_that_fit, job_shape

            if self._shape is None:
                self._shape = job_shape(self.job, self.cfg.keep_norm_affine)
            cfg = dataclasses.replace(self.cfg, rank=info.rank or self.cfg.rank)
            per_head_batch = self.spec.train.batch_size // self.cfg.heads
            out[info.node] = heads_that_fit(self._shape, cfg, per_head_batch, info.memory_gb * 2**30)
            if not out[info.node] and info.node not in self._too_small:  # said once per node
                self._too_small.add(info.node)
                log.warning("node %d (partition %d): %.3g GB hold no head of rank %d", info.node, info.partition,
                            info.memory_gb, cfg.rank)
        return out

    def wait_for_workers(self, grid: Grid, timeout: float) -> None:
        """run.nodes nodes if set, else until the nodes' capacity covers every head (a node that
        declares nothing counts for one head)."""
        nodes = self.spec.run.nodes or (len(parse_fleet(self.spec.run.fleet)) if self.spec.run.fleet else 0)
        wait_for_capacity(grid, self.partitions, nodes or self.cfg.heads, len if nodes else self.carried, timeout)
        if self.spec.run.fleet:  # simulated: the fleet is all there will be
            self._fleet()
            fleet = self.partitions.nodes(set(grid.get_node_ids()))
            if all(i.heads or i.memory_gb for i in fleet) and (held := self.carried(fleet)) < self.cfg.heads:
                raise SpecError(f"run.fleet: its nodes hold {held} head(s) of {self.cfg.heads} (memory-gb by the "
                                "estimate, lte_fed/memory.py): the others would never train")

    def carried(self, infos: list[NodeInfo]) -> int:
        """Heads these nodes can carry: each its declared `heads`, else what its `memory-gb` holds
        (the estimate; 0 where it holds none), else one."""
        fit = self._declared(infos)
        return sum(i.heads or fit.get(i.node, 1) for i in infos)

    def round_record(self) -> dict:
        """Which node (partition-id) trained which heads at which rank this round, and which
        heads were merged."""
        return {"placement": self.placement, "merged": self.merged_now}

    def _source(self, head: int, node: int) -> str:
        rec = self.ledger[head]
        if rec.fresh:
            return "fresh"
        if rec.holder == node and (rec.committed or self.spec.comm.up == "fp32"):
            return "local"
        if rec.holder == node and not rec.committed:
            # A compressed reply is decoded against the ledger's copy as of the head's last merge;
            # a reply kept but not merged left the worker elsewhere: restart it from that copy.
            return "restore"
        trusted = head in self.trust_local and (rec.committed or self.spec.comm.up == "fp32")  # as above
        return "local-or-restore" if trusted else "restore"

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, MetricRecord]:
        self.bytes_up, self.costs = 0, {}
        answered: set[str] = set()
        ids = {m.metadata.message_id: m for m in self._sent}  # set once pushed
        for reply in replies:
            sent = ids.get(reply.metadata.reply_to_message_id)
            if sent is None:
                log.warning("round %d: a reply to an unknown message was ignored", server_round)
                continue
            heads = [int(h) for h in sent.content[P.CONFIG]["heads"]]
            if sent.metadata.message_id not in answered:  # a duplicate moved no new information: count its bytes once
                self.bytes_up += reply_bytes(reply)
            answered.add(sent.metadata.message_id)
            error = reply.error.reason if reply.has_error() else None
            if error is not None and not self.spec.run.fleet:  # out of memory, say: restarted with less since?
                self.partitions.ask_again(sent.metadata.dst_node_id)
            for h in heads:  # each head is screened on its own: a bad one is refused alone
                self._round.receive(h, None if error is not None else reply.content, error,
                                    arrays=P.head_record(h), metrics=P.metrics_record(h))
                if error is None and _state_lost(reply, h):
                    log.warning("round %d: head %d's node could not use the state it had saved (its log says why) and "
                                "trained it from the server's copy: its work since that copy is lost", server_round, h)
            if server_round > self.first_round:  # the first includes every node's start-up: no pace
                self._note_pace(reply, self.arrived.get(reply.metadata.reply_to_message_id))
            if error is None and heads:  # one message, one cost: filed under its first head
                self.costs[heads[0]] = worker_costs(reply, server_round, heads, record=P.metrics_record(heads[0]))
                # its node restarted with another node config? (run.fleet, above too: simulated
                # nodes, whose declarations are the fleet's, not their own, and which never restart)
                if not self.spec.run.fleet and P.metrics_record(heads[0]) in reply.content:
                    self.partitions.redeclare(sent.metadata.dst_node_id, reply.content[P.metrics_record(heads[0])])
        if self.spec.train.log_alignment and len(self._round.got) > 1 and \
                len({self.rank_of(h) for h in self._round.got}) == 1:  # the measures compare heads of one rank
            self.alignment = self._alignment({h: s for h, (_, s, _) in self._round.got.items()})
        result = self._round.close(self.spec.run.min_heads)
        self.round_loss, self.merged_now = result.train_loss, sorted(result.merged)
        return None, MetricRecord({"merged_heads": len(result.merged)})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the merged model is evaluated on the server

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ the model
    @torch.no_grad()
    def _alignment(self, good: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        """head_cosine / head_grassmann (paper A.5) of the received heads, averaged over layers."""
        heads = sorted(good)
        vals = [head_alignment(torch.stack([good[h][f"{n}.lora_B"].float() for h in heads]),
                               torch.stack([good[h][f"{n}.lora_A"].float() for h in heads])) for n in self.plan.lora]
        return {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}

    def quantized_base(self) -> dict[str, torch.Tensor]:
        return {f"{n}.base.{k}": t for n, w in self.W.items() for k, t in quant.quantize(w, self.cfg.quant).items()}

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The merged plain model, in the original architecture's names."""
        return to_original_state(self.plan.record, {f"{n}.weight": w for n, w in self.W.items()} | self.replicas)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        tensors = prefixed("W", self.W) | prefixed("replica", self.replicas) | self.ledger.tensors()
        if self.outer is not None:
            tensors |= prefixed("outer", self.outer.tensors())
        trusted = [h for h in range(self.cfg.heads) if self.ledger[h].holder is not None]
        self.dir.save_checkpoint(tensors, checkpoint_meta(
            self.job, method="lte", round=self.round, wall_s=self.wall, run_id=self.run_id, heads=self.ledger.flags(),
            skipped_samples=self.skipped_samples, trust_local=trusted))
        self.checkpointed = self.round

    def resume(self) -> None:
        """Continue from `run.resume`: server state from its checkpoint, the history and (in
        simulation) the clients' saved state copied into this run's directory."""
        src, tensors, meta = open_resume(self.job)
        check_tensors_fit(unprefixed("W", tensors), self.W, src, "model")
        check_tensors_fit(unprefixed("replica", tensors), self.replicas, src, "model")
        with restoring(src):
            self.W, self.replicas = unprefixed("W", tensors), unprefixed("replica", tensors)
            self.ledger.load(tensors, meta["heads"])
            if self.outer is not None:
                self.outer.load(unprefixed("outer", tensors))
            self.round = self.checkpointed = int(meta["round"])
            self.wall, self.run_id = float(meta["wall_s"]), str(meta["run_id"])
            self.skipped_samples = int(meta.get("skipped_samples", 0))
            self.trust_local = set(int(h) for h in meta["trust_local"])
        self.dir.adopt(src, self.round)
        self.dir.adopt_client_state(src, self.run_id)
        log.info("resumed from %s at round %d", self.spec.run.resume, self.round)


def _state_lost(reply: Message, head: int) -> bool:
    """Whether `head`'s reply metrics say its node lost the state it had saved (P.STATE_LOST);
    False for a reply without them or malformed (screened elsewhere)."""
    try:
        value = reply.content[P.metrics_record(head)][P.STATE_LOST]
    except Exception:  # noqa: BLE001 -- a malformed reply must not crash the round
        return False
    return isinstance(value, int) and not isinstance(value, bool) and value == 1
