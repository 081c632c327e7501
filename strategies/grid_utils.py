"""Talking to nodes through a Flower Grid: waiting for them, learning their partitions,
sending and collecting replies, and measuring message bytes.

Node ids are random per run and the ServerApp can start before all nodes registered
(FLOWER_NOTES.md), so heads are keyed on each node's `partition-id`, asked with a QUERY.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from lte_fed import protocol as P
from lte_fed.costs import COST_KEYS, costs_line
from lte_fed.placement import NodeInfo, assign

log = logging.getLogger("lte_fed.server")
POLL_S = 0.2  # the longest wait between two pulls
MIN_POLL_S, POLL_SHARE = 0.005, 0.05


def message_bytes(msg: Message) -> int:
    """Bytes of a message as serialized for transport (every nested object, deflated)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def reply_bytes(msg: Message) -> int:
    """`message_bytes` of a worker's reply; one that cannot even be serialized counts 0."""
    try:
        return message_bytes(msg)
    except Exception:  # noqa: BLE001 -- a malformed reply must not crash the byte count
        return 0


def worker_costs(reply: Message, rnd: int, head, record: str = P.METRICS) -> dict[str, float]:
    """The cost metrics (lte_fed/costs.py) a reply carries in its record `record`, logged for its
    head (or a node's heads, a list: one message trains them all); whatever is missing or not a
    number is left out (a reply is screened for what matters elsewhere)."""
    try:
        metrics = reply.content[record]
        got = {k: float(metrics[k]) for k in COST_KEYS
               if k in metrics and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)}
    except Exception:  # noqa: BLE001 -- a malformed reply must not crash the logging
        return {}
    if got:
        log.info("%s", costs_line(rnd, head, got))
    return got


WAIT_LOG_S = 30.0  # while the server waits for nodes, a line this often says for what
# A node left out (a bad node config) is asked again this often: each QUERY is a fresh ClientApp
# process on the node (interpreter, torch), so not every poll.
REASK_S = 60.0


class _WaitLog:
    """Says, every WAIT_LOG_S while the server waits for its nodes, what it has and what it
    waits for (a run started before its SuperNodes sat silent until they came)."""

    def __init__(self, timeout: float):
        self.start = self.last = time.monotonic()
        self.timeout = timeout

    def __call__(self, have: str) -> None:
        now = time.monotonic()
        if now - self.last >= WAIT_LOG_S:
            self.last = now
            log.info("waiting for nodes: %s (%.0f s so far; gives up after %.0f s)", have, now - self.start, self.timeout)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> None:
    deadline, say = time.monotonic() + timeout, _WaitLog(timeout)
    while (n := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {expected} nodes registered within {timeout:.0f} s")
        say(f"{n} of {expected} registered")
        time.sleep(POLL_S)


def poll_interval(waited: float) -> float:
    """Seconds to sleep before the next pull, `waited` seconds after the push: a fixed share
    (POLL_SHARE) of the time waited so far, within [MIN_POLL_S, POLL_S]. A reply is then seen
    at most POLL_SHARE late (a fixed 0.2 s poll added half of that to every round, 10-25% of a
    sub-second round), while a long round still pulls only every POLL_S."""
    return min(POLL_S, max(MIN_POLL_S, POLL_SHARE * waited))


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, label: str = "",
                     arrived: dict[str, float] | None = None) -> list[Message]:
    """Push, then pull until every message has a reply or `timeout` passes; with a `label`
    (e.g. "round 3"), log how many have answered whenever more have. `arrived` gets, per message
    id answered, the seconds from the push to the pull that brought its reply."""
    ids = [i for i in grid.push_messages(messages) if i]
    waiting, replies = set(ids), []
    start = time.monotonic()
    deadline = start + timeout
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(waiting)))
        replies.extend(got)
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if arrived is not None:
            arrived.update({m.metadata.reply_to_message_id: time.monotonic() - start for m in got})
        if got and label:
            log.info("%s: %d of %d nodes answered (%.1f s)", label, len(ids) - len(waiting), len(ids),
                     time.monotonic() - start)
        if waiting:
            now = time.monotonic()
            time.sleep(max(0.0, min(poll_interval(now - start), deadline - now)))
    return replies


class Pending:
    """The messages rounds stopped waiting for (a node past the deadline or the timeout). Their
    nodes are busy until they answer: a busy node gets no new message, so a slow node works on
    one message at a time instead of a queue of stale ones, and its heads go where there is room
    meanwhile (lte_fed/placement.py, rule 3). A late reply is dropped (its heads were restarted
    from the server's state). A node silent for `run.round_timeout` after it was given up on
    counts as free again; a node Flower finds gone answers with an error, which frees it too."""

    def __init__(self):
        self.sent: dict[str, tuple[int, float]] = {}  # message id -> (its node, when it was given up on)
        self.late: list[Message] = []  # replies that came after their round (`take_late`)

    def left(self, msgs: list[Message], replies: list[Message]) -> None:
        """Remember the messages of a round that got no reply."""
        answered, now = {r.metadata.reply_to_message_id for r in replies}, time.monotonic()
        for m in msgs:
            if m.metadata.message_id and m.metadata.message_id not in answered:
                self.sent[m.metadata.message_id] = (m.metadata.dst_node_id, now)

    def busy(self, grid: Grid, timeout: float) -> set[int]:
        """The nodes still working on a message of an earlier round (late replies are pulled and
        dropped)."""
        if self.sent:
            for reply in grid.pull_messages(list(self.sent)):
                node, _ = self.sent.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                log.info("node %s answered after its round; the reply was dropped", node)
                self.late.append(reply)
        now = time.monotonic()
        self.sent = {m: (n, t) for m, (n, t) in self.sent.items() if now - t <= timeout}
        return {n for n, _ in self.sent.values()}

    def take_late(self) -> list[Message]:
        """The late replies pulled since the last call (not merged; what they say of their node's
        speed still counts, RoundLoop.heard_late)."""
        late, self.late = self.late, []
        return late

    def wait_for_a_free_node(self, grid: Grid, timeout: float) -> set[int]:
        """`busy`, after waiting (at most `timeout`) until some registered node is not."""
        if not self.sent:  # the usual round: nothing outstanding, no call to the grid
            return set()
        start = time.monotonic()
        while True:
            busy = self.busy(grid, timeout)
            nodes = set(grid.get_node_ids())
            waited = time.monotonic() - start
            if not nodes or nodes - busy or waited > timeout:
                return busy
            time.sleep(poll_interval(waited))


def _declaration(info: NodeInfo) -> tuple[int, int, int, float]:
    return info.partition, info.heads, info.rank, info.memory_gb


class PartitionMap:
    """partition-id <-> node id, what each node declared it can carry, and the round's
    head -> node placement (lte_fed/placement.py)."""

    def __init__(self, check: Callable[[NodeInfo], str | None] | None = None):
        self.node_of: dict[int, int] = {}  # partition-id -> node id
        self.info: dict[int, NodeInfo] = {}  # node id -> its partition and declared capacity
        self.known: set[int] = set()
        self.check = check  # what a node declares -> why it cannot take part in this run, or None
        self.refused: dict[int, tuple[float, str]] = {}  # node id -> (when, why) it was left out

    def discover(self, grid: Grid, timeout: float) -> None:
        """Ask every node not seen yet for its partition-id and capacity. A node that answers with
        an error (its node config is bad) or declares what `check` refuses is left out, said once
        in the log, and asked again after REASK_S (restarted with the same key, it has the same
        node id). A node that left and came back is asked again."""
        now, ids = time.monotonic(), grid.get_node_ids()
        # A node that dropped out is asked again when it is back: it may have restarted with
        # another node config (one back within Flower's heartbeat window: its next reply, `redeclare`).
        self.known &= set(ids)
        new = [n for n in ids if n not in self.known and now - self.refused.get(n, (-REASK_S, ""))[0] >= REASK_S]
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in send_and_receive(grid, msgs, timeout):
            node = next(m.metadata.dst_node_id for m in msgs if m.metadata.message_id == reply.metadata.reply_to_message_id)
            if reply.has_error():
                self._refuse(node, reply.error.reason)
                continue
            c = reply.content["config"]
            self.take(NodeInfo(node, int(c["partition-id"]), int(c.get("heads", 0)), int(c.get("rank", 0)),
                               float(c.get("memory-gb", 0.0)), float(c.get("rss_peak_mib", 0.0))))

    def take(self, info: NodeInfo) -> bool:
        """Record what a node declares, unless `check` refuses it (then it is left out, and asked
        again after REASK_S); whether it was taken. A change to what it declared before is a
        warning: it restarted with another node config."""
        if why := self.check(info) if self.check else None:
            self._refuse(info.node, why)
            return False
        self.refused.pop(info.node, None)
        before = self.info.get(info.node)
        self.add(info)
        declared = ", ".join(f"{k} {v:g}" for k, v in (("heads", info.heads), ("rank", info.rank),
                                                       ("memory", info.memory_gb)) if v) or "no capacity (it takes its share)"
        declared += " GB" if info.memory_gb else ""
        if before is None:
            log.info("node of partition %d: declares %s; the process that answered peaked at %.0f MiB",
                     info.partition, declared, info.idle_rss_mib)
        elif _declaration(before) != _declaration(info):
            log.warning("node of partition %d now declares %s (it restarted with another node config): its "
                        "placement follows from the next round", info.partition, declared)
        return True

    def redeclare(self, node: int, metrics) -> None:
        """A TRAIN reply's metrics say what its node declares now (`P.declared`); a node restarted
        with another node config between two QUERYs would otherwise keep its old declaration."""
        now, old = P.declared(metrics), self.info.get(node)
        if now is None or old is None or now == _declaration(old):
            return
        self.take(NodeInfo(node, *now, idle_rss_mib=old.idle_rss_mib))

    def ask_again(self, node: int) -> None:
        """Ask `node` what it declares at the next `discover`: its message failed, perhaps for
        what it declared (out of memory), and it may have restarted with less since."""
        self.known.discard(node)

    def _refuse(self, node: int, why: str) -> None:
        """Leave `node` out (no head goes there, what it declared before is forgotten) until it
        is asked again, after REASK_S."""
        if self.refused.get(node, (0.0, ""))[1] != why:
            log.error("node %d is left out of the run: %s (asked again every %.0f s)", node, why, REASK_S)
        self.refused[node] = (time.monotonic(), why)
        self.info.pop(node, None)
        self.known.discard(node)
        self._unmap(node)

    def _unmap(self, node: int) -> None:
        """Forget which partition-id `node` declared."""
        for partition in [p for p, n in self.node_of.items() if n == node]:
            del self.node_of[partition]

    def add(self, info: NodeInfo) -> None:
        """Record a node's answer (`discover` does this for every new node)."""
        other = self.node_of.get(info.partition, info.node)
        if other != info.node and other in self.info:
            log.warning("node %d declares partition-id %d, as node %d did: the placement and summary.json name nodes "
                        "by partition-id and cannot tell them apart; give each node its own", info.node,
                        info.partition, other)
        self._unmap(info.node)  # it may have declared another partition-id before
        self.node_of[info.partition] = info.node
        self.info[info.node] = info
        self.known.add(info.node)

    def nodes(self, alive: set[int]) -> list[NodeInfo]:
        return [self.info[n] for n in sorted(alive) if n in self.info]

    def assign(self, heads: int, alive: set[int], holders: dict[int, int | None] | None = None,
               declared: dict[int, int] | None = None) -> dict[int, int]:
        """head -> alive node (`placement.assign`: heads stay where their state is, the rest fill
        the nodes in partition order up to their capacity)."""
        return assign(heads, self.nodes(alive), holders or {}, declared)


def wait_for_capacity(grid: Grid, partitions: PartitionMap, heads: int, capacity, timeout: float) -> None:
    """Wait until the registered nodes can carry `heads` heads (`capacity(nodes)` says how many
    they carry), asking every new node what it declares."""
    deadline, say = time.monotonic() + timeout, _WaitLog(timeout)
    while True:
        partitions.discover(grid, timeout)
        alive = set(grid.get_node_ids())
        have = capacity(partitions.nodes(alive))
        if have >= heads:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {len(alive)} registered node(s) carry {have} of {heads} heads after {timeout:.0f} s")
        say(f"{len(alive)} registered, carrying {have} of {heads} heads")
        time.sleep(POLL_S)


class CountingGrid(Grid):
    """A Grid that passes everything through and counts the serialized bytes of the messages
    pushed (down) and pulled (up): used to measure what a built-in strategy moves."""

    def __init__(self, grid: Grid):
        self.inner, self.bytes_down, self.bytes_up = grid, 0, 0

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs):
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        self.bytes_down += sum(message_bytes(m) for m in messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        got = list(self.inner.pull_messages(message_ids))
        self.bytes_up += sum(message_bytes(m) for m in got)
        return got

    def send_and_receive(self, messages, *, timeout=None):
        return send_and_receive(self, list(messages), 3600.0 if timeout is None else timeout)
