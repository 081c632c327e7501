"""The full-model baseline (method=fedavg): every node trains T local AdamW steps of the whole
plain model on its shard and the server averages the models, weighted by examples (FedAvg).

It runs in the same round loop as LTE (strategies/rounds.py), so it gets the same reply gate,
checkpoints, exact resume and run directory. Worker n (the node holding partition n) is "head"
n in the protocol's terms; its AdamW state stays on the node, keyed by run id and round.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from lte_fed import protocol as P
from lte_fed.job import Job
from lte_fed.ledger import Guard, relative_change
from lte_fed.rundir import RunDir, check_tensors_fit, checkpoint_meta, open_resume, restoring
from lte_fed.spec import Spec

from .grid_utils import PartitionMap, message_bytes, reply_bytes, worker_costs
from .rounds import RoundLoop

log = logging.getLogger("lte_fed.server")


class FedAvgStrategy(RoundLoop):
    def __init__(self, spec: Spec, job: Job, out: str | Path):
        self.spec, self.job, self.dir = spec, job, RunDir(out)
        self.model = {k: v.detach().float().clone() for k, v in job.plain.state_dict().items()}
        self.layout = {k: (tuple(v.shape), torch.float32) for k, v in self.model.items()}
        self.guard = Guard(spec.run.max_update_ratio, 0.0)
        self.partitions = PartitionMap()
        self.run_id, self.round, self.wall, self.checkpointed = uuid.uuid4().hex[:16], 0, 0.0, 0
        self.bytes_up = self.bytes_down = 0
        self.round_loss, self.alignment = math.nan, {}
        self.costs: dict[int, dict] = {}  # worker -> what its message cost it (lte_fed/costs.py)
        self._sent: list[Message] = []
        self.merged_now: list[int] = []  # the workers this round averaged

    def param_counts(self) -> dict[str, int]:
        """summary.json's "params": every weight trains (as method=full's)."""
        return {"trainable": sum(t.numel() for t in self.model.values())}

    def summary(self) -> None:
        log.info("FedAvg: %d workers, T=%d local steps, full model", self.spec.lte.heads, self.spec.merge_every)

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid) -> Iterable[Message]:
        s = self.spec
        model = ArrayRecord(P.wire(self.model))
        free = self.free_nodes(grid)
        nodes = {n: node for n, node in self.partitions.node_of.items() if node in free}
        self._sent = [Message(RecordDict({P.WEIGHTS: model, P.CONFIG: ConfigRecord({
            "head": n, "round": server_round, "server-round": server_round, "spec": P.spec_to_json(s.to_dict()),
            "run_id": self.run_id, "state_round": server_round - 1, "keep_from": self.checkpointed,
            "data_id": self.job.data_id})}),
            dst_node_id=node, message_type=MessageType.TRAIN) for n, node in sorted(nodes.items()) if n < s.lte.heads]
        self.bytes_down = sum(message_bytes(m) for m in self._sent)
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, MetricRecord]:
        ids = {m.metadata.message_id: int(m.content[P.CONFIG]["head"]) for m in self._sent}
        good: dict[int, tuple[dict[str, torch.Tensor], float, float]] = {}
        seen: set[int] = set()
        self.bytes_up, self.costs, self.merged_now = 0, {}, []
        for reply in replies:
            worker = ids.get(reply.metadata.reply_to_message_id)
            if worker is None or worker in seen:
                log.error("round %d: reply ignored: %s", server_round, "unknown message" if worker is None else
                          f"a second answer from worker {worker}")
                continue
            seen.add(worker)
            self.bytes_up += reply_bytes(reply)
            error = reply.error.reason if reply.has_error() else None
            if error is None:
                self.costs[worker] = worker_costs(reply, server_round, worker)
            verdict = P.screen_reply(None if error else reply.content, self.layout, worker, error, arrays=P.WEIGHTS)
            reason = verdict.reason or self._too_large(verdict.state)
            if reason:
                log.error("round %d: worker %d not merged: %s", server_round, worker, reason)
                continue
            weight = float(reply.content[P.METRICS].get("num-examples", 1))
            good[worker] = (verdict.state, verdict.train_loss, weight if math.isfinite(weight) and weight > 0 else 1.0)
        self.round_loss = sum(v[1] for v in good.values()) / len(good) if good else math.nan
        if len(good) < self.spec.run.min_heads:
            log.error("round %d: %d good worker(s) < run.min_heads=%d: nothing merged", server_round, len(good),
                      self.spec.run.min_heads)
            return None, MetricRecord({"merged_heads": 0})
        total = sum(w for _, _, w in good.values())
        merged = {k: sum(good[n][0][k].float() * (good[n][2] / total) for n in sorted(good)) for k in self.model}
        if not all(torch.isfinite(t).all() for t in merged.values()):
            log.error("round %d: the average is not finite: nothing merged", server_round)
            return None, MetricRecord({"merged_heads": 0})
        self.model, self.merged_now = merged, sorted(good)
        return None, MetricRecord({"merged_heads": len(good)})

    def round_record(self) -> dict:
        return {"merged": self.merged_now}

    def _too_large(self, state: dict[str, torch.Tensor]) -> str | None:
        for k, t in state.items():
            ratio = relative_change(t, self.model[k])
            if self.guard.max_ratio and not ratio <= self.guard.max_ratio:
                return f"{k!r} moved {ratio:.3g}x its size (run.max_update_ratio={self.guard.max_ratio:g})"
        return None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def plain_state(self) -> dict[str, torch.Tensor]:
        return self.model

    def save_checkpoint(self) -> None:
        self.dir.save_checkpoint(self.model, checkpoint_meta(self.job, method="fedavg", round=self.round,
                                                             wall_s=self.wall, run_id=self.run_id))
        self.checkpointed = self.round

    def resume(self) -> None:
        src, tensors, meta = open_resume(self.job)
        check_tensors_fit(tensors, self.model, src, "model")
        self.model = {k: t.float() for k, t in tensors.items()}
        with restoring(src):
            self.round = self.checkpointed = int(meta["round"])
            self.wall, self.run_id = float(meta["wall_s"]), str(meta["run_id"])
        self.dir.adopt(src, self.round)
        self.dir.adopt_client_state(src, self.run_id)
        log.info("resumed from %s at round %d", self.spec.run.resume, self.round)
