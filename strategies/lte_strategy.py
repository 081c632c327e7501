"""LTEStrategy: LoRA-the-Explorer as a Flower strategy.

The server holds the full-precision base W and the replicas, broadcasts q(W) each round,
assigns head n to the node holding partition n (or, when that node is gone, to a free or the
least busy node, with the head's state), and merges the heads that came back:

    W <- W + (s/|S|) Σ_{n∈S} (B_n A_n - V_n),   replicas <- mean over S

V_n is head n's contribution already in W (exact variant) or 0 (reset). Replies are
validated (names, shapes, dtypes, finite values) before anything is touched; a bad one is
rejected and logged with its node and reason. Fewer than `run.min_heads` good replies: the
round merges nothing and says so. After every round the merged plain model is evaluated on the
server and the run directory (DESIGN.md §4) is written, with bytes counted from the real
serialized messages.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from lte_fed import protocol as P
from lte_fed import quant
from lte_fed.convert import to_original_state
from lte_fed.engine import build_summary, write_sample
from lte_fed.job import Job, lte_config, progress
from lte_fed.lora import merge_update
from lte_fed.lte import HeadLTE, plan
from lte_fed.rundir import RunDir
from lte_fed.spec import Spec
from lte_fed.train import evaluate, head_alignment, headline

from .grid_utils import PartitionMap, message_bytes, send_and_receive, wait_for_nodes

log = logging.getLogger("lte_fed.server")
RESUMED = -1  # holder marker: "whichever node now holds the head's partition"


class LTEStrategy(Strategy):
    def __init__(self, spec: Spec, job: Job, out: str | Path, round_timeout: float = 600.0):
        self.spec, self.job, self.dir = spec, job, RunDir(out)
        self.cfg = lte_config(spec)
        self.round_timeout = round_timeout
        N = self.cfg.heads
        prepared = copy.deepcopy(job.plain)
        self.plan = plan(prepared, self.cfg.keep_norm_affine)
        self.W = {n: prepared.get_submodule(n).weight.detach().float().clone() for n in self.plan.lora}
        self.replicas = {n: prepared.get_parameter(n).detach().float().clone() for n in self.plan.replicas}
        del prepared
        # Each head's state as of its last merge (what a node taking it over restores).
        init_cfg = dataclasses.replace(self.cfg, quant="none")  # only the factors are needed
        self.heads = [HeadLTE(job.plain, init_cfg, n).head_state(with_corr=True) for n in range(N)]
        self.layout = P.expected_head_layout(self.heads[0])
        self.committed = [False] * N  # the head's last reply was merged; its worker must commit
        self.fresh = [True] * N  # never trained: a worker starts it from its init
        self.holder: list[int | None] = [None] * N  # node known to hold the head's latest state
        self.round, self.wall = 0, 0.0
        self.partitions = PartitionMap()
        self.eval_model = copy.deepcopy(job.plain).to(job.device)
        self._sent: list[tuple[Message, int, int]] = []  # (message, head, node) of this round
        self._bytes_down = 0
        self._alignment: dict[str, float] = {}  # this round's head alignment (train.log_alignment)

    # ------------------------------------------------------------------ Strategy interface
    def summary(self) -> None:
        c = self.cfg
        log.info("LTEStrategy: %d heads, rank %d, alpha %g, T=%d, %s variant, base %s, min_heads %d",
                 c.heads, c.rank, c.alpha, self.spec.merge_every, c.variant, c.quant, self.spec.run.min_heads)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        s = self.spec
        start = (server_round - 1) * s.merge_every
        steps = min(s.merge_every, s.train.steps - start)
        base = ArrayRecord(P.wire(self.quantized_base()))
        replicas = ArrayRecord(P.wire(self.replicas))
        spec_json = P.spec_to_json(s.to_dict())
        assignment = self.partitions.assign(self.cfg.heads, set(grid.get_node_ids()))
        self._sent = []
        for head, node in assignment.items():
            content = {P.BASE: base, P.REPLICAS: replicas}
            # RESUMED: after a restart, the node of partition n loads its own saved state of the
            # checkpointed round (exact resume); if it cannot, it fails and we restore next round.
            takeover = self.holder[head] not in (node, RESUMED) and not self.fresh[head]
            if takeover:
                content[P.RESTORE] = ArrayRecord(P.wire(self.heads[head]))
                if self.holder[head] is not None or server_round > 1:
                    log.warning("round %d: head %d goes to node %d with its state from the server", server_round, head, node)
            content[P.CONFIG] = ConfigRecord({
                "head": head, "start_step": start, "steps": steps, "round": server_round, "spec": spec_json,
                "committed": self.committed[head] and not takeover, "fresh": self.fresh[head],
                "state_round": server_round - 1,
            })
            self._sent.append((Message(RecordDict(content), dst_node_id=node, message_type=MessageType.TRAIN), head, node))
        for head in sorted(set(range(self.cfg.heads)) - set(assignment)):
            log.warning("round %d: no node available for head %d; it waits", server_round, head)
        self._bytes_down = sum(message_bytes(m) for m, _, _ in self._sent)
        return [m for m, _, _ in self._sent]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_id = {m.metadata.message_id: (head, node) for m, head, node in self._sent}
        good: dict[int, dict[str, torch.Tensor]] = {}
        losses = []
        answered = set()
        self._bytes_up = 0
        for reply in replies:
            head, node = by_id.get(reply.metadata.reply_to_message_id, (None, None))
            if head is None:
                log.warning("round %d: reply to an unknown message ignored", server_round)
                continue
            answered.add(head)
            self._bytes_up += message_bytes(reply)
            self.committed[head] = False
            if reply.has_error():
                log.error("round %d: head %d on node %d failed: %s", server_round, head, node, reply.error.reason)
                self.holder[head] = None
                continue
            try:
                state = reply.content[P.HEAD].to_torch_state_dict()
                P.validate_head_reply(state, self.layout)
            except (P.ReplyError, KeyError) as e:
                log.error("round %d: rejected reply of head %d from node %d: %s", server_round, head, node, e)
                self.holder[head] = None  # its local state is suspect: restore next time
                continue
            good[head] = state
            self.holder[head] = node
            losses.append(float(reply.content[P.METRICS]["train_loss"]))
        for head, node in ((h, n) for _, h, n in self._sent if h not in answered):
            log.error("round %d: no reply from node %d for head %d", server_round, node, head)
            self.committed[head] = False
            self.holder[head] = None
        self._round_heads, self._round_loss = sorted(good), (sum(losses) / len(losses) if losses else float("nan"))
        if len(good) < self.spec.run.min_heads:
            log.error("round %d: %d good head(s) < run.min_heads=%d: nothing merged this round",
                      server_round, len(good), self.spec.run.min_heads)
            return None, MetricRecord({"merged_heads": 0})
        if self.spec.train.log_alignment and len(good) > 1:
            self._alignment = self.alignment(good)
        self.merge(good)
        return None, MetricRecord({"merged_heads": len(good), "train_loss": self._round_loss})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the merged model is evaluated on the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------------- the merge
    @torch.no_grad()
    def alignment(self, good: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
        """head_cosine / head_grassmann (paper A.5) of the received heads' B_n A_n, averaged over
        the LoRA layers, as the fused engine logs them before a merge."""
        heads = sorted(good)
        vals = [head_alignment(torch.stack([good[h][f"{n}.lora_B"].float() for h in heads]),
                               torch.stack([good[h][f"{n}.lora_A"].float() for h in heads])) for n in self.plan.lora]
        return {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}

    @torch.no_grad()
    def merge(self, good: dict[int, dict[str, torch.Tensor]]) -> None:
        """Merge the heads in `good` (sorted by head, so sums are deterministic)."""
        heads = sorted(good)
        exact = self.cfg.variant == "exact"
        for name in self.plan.lora:
            B = torch.stack([good[h][f"{name}.lora_B"].float() for h in heads])
            A = torch.stack([good[h][f"{name}.lora_A"].float() for h in heads])
            VB = torch.stack([self.heads[h][f"{name}.corr_B"] for h in heads]) if exact else None
            VA = torch.stack([self.heads[h][f"{name}.corr_A"] for h in heads]) if exact else None
            self.W[name] += merge_update(B, A, VB, VA, self.cfg.scale)
        for name in self.plan.replicas:
            self.replicas[name] = torch.stack([good[h][name].float() for h in heads]).mean(0)
        for h in heads:
            state = self.heads[h]
            for name in self.plan.lora:
                A, B = good[h][f"{name}.lora_A"].float(), good[h][f"{name}.lora_B"].float()
                state[f"{name}.lora_A"] = A
                if exact:
                    state[f"{name}.lora_B"], state[f"{name}.corr_A"], state[f"{name}.corr_B"] = B, A, B
                else:
                    state[f"{name}.lora_B"] = torch.zeros_like(B)
            self.committed[h], self.fresh[h] = True, False
        for h in range(self.cfg.heads):
            self.heads[h].update({k: v.clone() for k, v in self.replicas.items()})

    def quantized_base(self) -> dict[str, torch.Tensor]:
        return {f"{n}.base.{k}": t for n, w in self.W.items() for k, t in quant.quantize(w, self.cfg.quant).items()}

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The merged plain model, in the original architecture's names."""
        prepared = {f"{n}.weight": w for n, w in self.W.items()} | self.replicas
        return to_original_state(self.plan.record, prepared)

    # --------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {"round": self.round, "wall_s": self.wall, "W": self.W, "replicas": self.replicas, "heads": self.heads,
                "committed": self.committed, "fresh": self.fresh, "spec": self.spec.to_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.round, self.wall = sd["round"], sd["wall_s"]
        self.W, self.replicas, self.heads = sd["W"], sd["replicas"], sd["heads"]
        self.committed, self.fresh = sd["committed"], sd["fresh"]
        self.holder = [RESUMED] * self.cfg.heads  # nodes are new after a restart

    # ------------------------------------------------------------------------- the loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, stop_after_rounds: int | None = None) -> Result:
        s = self.spec
        self.summary()
        num_rounds = num_rounds or s.rounds
        wait_for_nodes(grid, self.cfg.heads, timeout)
        self.partitions.discover(grid, timeout)
        result = Result()
        done_now = 0
        while self.round < num_rounds:
            rnd, t0 = self.round + 1, time.perf_counter()
            self.partitions.discover(grid, timeout)  # nodes that (re)joined since
            msgs = self.configure_train(rnd, None, ConfigRecord(), grid)
            replies = send_and_receive(grid, msgs, self.round_timeout)
            _, metrics = self.aggregate_train(rnd, replies)
            self.round = rnd
            self.wall += time.perf_counter() - t0
            row = self.log_round(rnd, metrics)
            result.train_metrics_clientapp[rnd] = metrics
            result.evaluate_metrics_serverapp[rnd] = MetricRecord({k: row[k] for k in ("test_loss", "test_acc", "val_loss", "perplexity") if k in row})
            if rnd % s.run.checkpoint_every == 0 or rnd == num_rounds:
                self.dir.save_checkpoint(self.state_dict())
            done_now += 1
            if stop_after_rounds is not None and done_now >= stop_after_rounds and self.round < num_rounds:
                return result
        self.finish()
        return result

    def log_round(self, rnd: int, metrics: MetricRecord | None) -> dict:
        s = self.spec
        self.eval_model.load_state_dict(self.plain_state())
        ev = evaluate(self.eval_model, self.job.data, self.job.img_size, self.job.device, s.train.eval_batch)
        step = min(rnd * s.merge_every, s.train.steps)
        row = {"round": rnd, **progress(self.job, step), "train_loss": self._round_loss, **ev,
               "bytes_up": self._bytes_up, "bytes_down": self._bytes_down, "wall_s": round(self.wall, 3),
               "merged_heads": int(metrics["merged_heads"]) if metrics else 0, **self._alignment}
        self._alignment = {}
        self.dir.append_metrics(row)
        log.info("round %d: merged %d head(s), train loss %.4f, %s, up %d B, down %d B",
                 rnd, row["merged_heads"], row["train_loss"], headline(row), row["bytes_up"], row["bytes_down"])
        return row

    def finish(self) -> dict:
        self.dir.save_model(self.plain_state(), metadata={"model": self.spec.model.name, "method": "lte"})
        if self.job.is_text:
            self.eval_model.load_state_dict(self.plain_state())
            write_sample(self.dir, self.eval_model, self.job)
        summary = build_summary(self.spec, self.dir.read_metrics(), self.job,
                                params={"base": sum(w.numel() for w in self.W.values())})
        self.dir.write_summary(summary)
        return summary

