"""The server's round loop, shared by LTE and the FedAvg baseline.

`RoundLoop.start` waits for the nodes, then per round: configure (one message per worker),
push and pull, aggregate, evaluate the merged model on the server, append a row to
metrics.jsonl and checkpoint. A subclass supplies one round (`configure_train`,
`aggregate_train`), the model (`plain_state`) and its checkpoint (`save_checkpoint`,
`resume`). Resuming starts the loop after the checkpointed round.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from lte_fed.costs import round_costs
from lte_fed.engine import build_summary, write_sample
from lte_fed.job import Job, progress
from lte_fed.rundir import RunDir, diverged, merged_nothing
from lte_fed.spec import Spec
from lte_fed.train import evaluate, headline, lr_at

from .grid_utils import PartitionMap, Pending, send_and_receive, wait_for_capacity, wait_for_nodes

log = logging.getLogger("lte_fed.server")


class RoundLoop(Strategy):
    """Subclasses set: spec, job, dir, partitions, run_id, round, wall, checkpointed,
    bytes_up, bytes_down, round_loss, alignment, costs (head -> its reply's cost metrics)."""

    spec: Spec
    busy: set[int] = frozenset()  # nodes still on an earlier round's message (set each round)
    skipped_samples: int = 0  # samples of the steps not sent (paced nodes, waiting heads: LTEStrategy), so far
    arrived: dict[str, float] = {}  # this round's: message id -> seconds from the push to its reply
    first_round: int = 1  # this server's first round (it includes every node's start-up)
    job: Job
    dir: RunDir
    partitions: PartitionMap

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        s = self.spec
        self.summary()
        num_rounds = num_rounds or s.rounds
        self.eval_model = copy.deepcopy(self.job.plain).to(self.job.device)
        result = Result()
        if self.round < num_rounds:
            self.wait_for_workers(grid, timeout)
        first = self.first_round = self.round + 1
        pending = Pending()
        while self.round < num_rounds:
            rnd, t0 = self.round + 1, time.perf_counter()
            if not grid.get_node_ids():  # every node gone at once (restarting): wait for one, as before
                log.warning("round %d: no node is registered; waiting for one (up to %.0f s)", rnd, timeout)
                wait_for_capacity(grid, self.partitions, 1, len, timeout)  # round 1, not burn the rounds
            self.busy = pending.wait_for_a_free_node(grid, s.run.round_timeout)
            self.heard_late(pending.take_late())
            self.partitions.discover(grid, timeout)  # nodes that (re)joined since
            msgs = list(self.configure_train(rnd, None, ConfigRecord(), grid))
            self.arrived = {}
            replies = send_and_receive(grid, msgs, round_wait(s, rnd, first), label=f"round {rnd}",
                                       arrived=self.arrived)
            pending.left(msgs, replies)
            _, metrics = self.aggregate_train(rnd, replies)
            self.round = rnd
            self.wall += time.perf_counter() - t0
            row = self.log_round(rnd, metrics)
            if why := diverged(row):  # stop, keeping the last finite checkpoint (run_flower reports it)
                log.error(why)
                break
            result.train_metrics_clientapp[rnd] = metrics
            result.evaluate_metrics_serverapp[rnd] = MetricRecord(
                {k: row[k] for k in ("test_loss", "test_acc", "val_loss", "perplexity") if k in row})
            if rnd % s.run.checkpoint_every == 0 or rnd == num_rounds:
                self.save_checkpoint()
        self.finish()
        return result

    def free_nodes(self, grid: Grid) -> set[int]:
        """The registered nodes that this round may give work: not `busy` with an earlier
        round's message (grid_utils.Pending)."""
        return set(grid.get_node_ids()) - self.busy

    def heard_late(self, replies: list) -> None:
        """Replies that came after their round (dropped; LTEStrategy learns the node's pace)."""

    def wait_for_workers(self, grid: Grid, timeout: float) -> None:
        """Before round 1: one node per worker (LTEStrategy waits for capacity instead)."""
        wait_for_nodes(grid, self.spec.lte.heads, timeout)

    def param_counts(self) -> dict[str, int]:
        """summary.json's "params" (each strategy counts its own model's)."""
        raise NotImplementedError

    def merges_per_head(self, rows: list[dict]) -> dict:
        """summary.json's "merges_per_head" (from the rows' "merged" lists: LTE's heads, FedAvg's
        workers), each head's count of the rounds that merged it, out of "rounds"; a head missing
        from some says so here, at the end, where a line in one round's log is easy to miss (a
        node that failed every round)."""
        if not rows or not all(isinstance(r.get("merged"), list) for r in rows):
            return {}
        counts = [sum(h in r["merged"] for r in rows) for h in range(self.spec.heads)]
        for h, n in enumerate(counts):
            if n < len(rows):
                log.warning("head %d was merged in %d of %d rounds (each round's reasons are above)", h, n, len(rows))
        return {"merges_per_head": counts, "rounds": len(rows)}

    def round_record(self) -> dict:
        """Extra fields of this round's metrics row (LTEStrategy: the placement)."""
        return {}

    def log_round(self, rnd: int, metrics: MetricRecord) -> dict:
        s = self.spec
        self.eval_model.load_state_dict(self.plain_state())
        ev = evaluate(self.eval_model, self.job.data, self.job.img_size, self.job.device, s.train.eval_batch)
        step = min(rnd * s.merge_every, s.train.steps)
        row = {"round": rnd, **progress(self.job, step, self.skipped_samples), "train_loss": self.round_loss, **ev,
               "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "wall_s": round(self.wall, 3),
               "lr": lr_at(step - 1, s.lr, s.train.warmup, s.train.steps),  # the round's last step's, as fused rows
               "merged_heads": int(metrics["merged_heads"]), **self.alignment, **round_costs(self.costs),
               **self.round_record()}
        self.alignment, self.costs = {}, {}
        self.dir.append_metrics(row)
        log.info("round %d: merged %d of %d, train loss %s, %s, up %d B, down %d B", rnd,
                 row["merged_heads"], s.heads, "-" if math.isnan(row["train_loss"]) else f"{row['train_loss']:.4f}",
                 headline(row), row["bytes_up"], row["bytes_down"])
        return row

    def finish(self) -> dict:
        s = self.spec
        rows = self.dir.read_metrics()
        keep = not (rows and diverged(rows[-1]))  # a NaN model is neither kept nor sampled
        if keep:
            self.dir.save_model(self.plain_state(), metadata={"model": s.model.name, "method": s.method})
        if merged_nothing(rows):
            log.error("no round merged any head: the model is untrained (each round's reasons are above)")
        extra = self.merges_per_head(rows)
        # LTE: which node (partition-id) trained which heads at which rank in the last round
        # (every round's is in its metrics row)
        extra |= {"placement": rows[-1]["placement"]} if rows and "placement" in rows[-1] else {}
        # what every node that answered declared, and the peak memory of the process that answered
        nodes = sorted(self.partitions.info.values(), key=lambda i: i.partition)
        extra["nodes"] = [{"partition": i.partition, "heads": i.heads, "rank": i.rank, "memory_gb": i.memory_gb,
                           "idle_rss_mib": i.idle_rss_mib} for i in nodes]
        summary = build_summary(s, rows, self.job, params=self.param_counts(), run_id=self.run_id, **extra)
        self.dir.write_summary(summary)
        if keep and self.job.is_text:  # last: the run's results are on disk while it samples
            self.eval_model.load_state_dict(self.plain_state())
            write_sample(self.dir, self.eval_model, self.job)
        return summary


def round_wait(spec: Spec, rnd: int, first: int) -> float:
    """Seconds round `rnd` waits for replies: run.round_deadline if set (the heads that answered
    by then are merged, the others restart from the server's state), else run.round_timeout.
    The server's first round (`first`) waits up to the timeout: it includes every node's start-up
    (data, model), which is no node's slowness."""
    if spec.run.round_deadline and rnd > first:
        return min(spec.run.round_deadline, spec.run.round_timeout)
    return spec.run.round_timeout


def out_dir(spec: Spec) -> Path:
    return Path(spec.run.out or f"outputs/flwr-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
