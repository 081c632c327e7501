"""Which node trains which heads in a round: the server's placement of N heads on nodes of
unequal capacity (pure; strategies/lte_strategy.py calls it every round).

A node declares what it can carry in its node config: `heads` (how many heads at once) or
`memory-gb` (turned into heads by the memory estimate, `memory.heads_that_fit`), and optionally
`rank`. A node that declares nothing takes an even share of the heads the declared nodes leave.

Rules, in order:
1. A head stays on the node that holds its latest state (no state moves, AdamW kept), while
   that node has room.
2. The other heads fill the nodes in partition-id order, up to each node's capacity: on a
   fresh start node 0 takes heads 0..k0-1, node 1 the next k1, and so on.
3. Heads that find no room wait for the next round (a node's capacity is a promise to its
   memory; it is never exceeded). A head therefore outlives its node: when its node is gone it
   moves to any node with room, with its state from the server. A node still busy with an
   earlier round's message counts as gone until it answers (strategies/grid_utils.py `Pending`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself (its answer to the QUERY)."""

    node: int  # Flower node id (random per run)
    partition: int  # node config partition-id: the order nodes are filled in
    heads: int = 0  # declared capacity in heads (0: undeclared)
    rank: int = 0  # declared LoRA rank (0: the run's lte.rank)
    memory_gb: float = 0.0  # declared memory budget (0: none)
    idle_rss_mib: float = 0.0  # peak memory of the process that answered (deployed: no job yet)


def capacities(nodes: list[NodeInfo], heads: int, declared: dict[int, int] | None = None) -> dict[int, int]:
    """node id -> how many heads it carries this round. `declared` (node -> heads) overrides
    the nodes' `heads` (e.g. from a memory budget). Undeclared nodes share what the declared
    ones leave evenly (rounded up, at least 1)."""
    declared = declared or {}
    cap = {i.node: max(0, declared[i.node] if i.node in declared else i.heads) for i in nodes}
    open_nodes = [i.node for i in nodes if i.node not in declared and i.heads <= 0]
    rest = max(0, heads - sum(cap.values()))
    for n in open_nodes:
        cap[n] = max(1, math.ceil(rest / len(open_nodes)))
    return cap


def assign(heads: int, nodes: list[NodeInfo], holders: dict[int, int | None],
           declared: dict[int, int] | None = None) -> dict[int, int]:
    """head -> node id for the heads that get a node this round (module docstring's rules).

    holders: head -> node holding its latest state (None or a gone node: nobody)."""
    cap = capacities(nodes, heads, declared)
    load = {n: 0 for n in cap}
    out: dict[int, int] = {}
    for h in range(heads):
        node = holders.get(h)
        if node in cap and load[node] < cap[node]:
            out[h] = node
            load[node] += 1
    order = [i.node for i in sorted(nodes, key=lambda i: (i.partition, i.node))]
    for h in range(heads):
        if h in out:
            continue
        node = next((n for n in order if load[n] < cap[n]), None)
        if node is None:
            continue
        out[h] = node
        load[node] += 1
    return dict(sorted(out.items()))


def by_node(assignment: dict[int, int]) -> dict[int, list[int]]:
    """head -> node as node -> its heads (ascending)."""
    out: dict[int, list[int]] = {}
    for h, node in sorted(assignment.items()):
        out.setdefault(node, []).append(h)
    return out


def steps_that_fit(steps: int, deadline_s: float, step_s: float | None, other_s: float = 0.0,
                   share: float = 0.8) -> int:
    """How many of a round's `steps` local steps a node runs under a round deadline (`run.
    deadline_steps=fit`): all of them unless its pace says they would not fit, else as many as
    fit in `share` of the deadline (the rest is slack for the jitter of a shared machine), at
    least 1. step_s: the node's seconds per training step (None: not measured yet); other_s:
    the rest of its round trip (data, model, reply, messaging). A node paced down this way still trains its heads every round, on the first steps of
    the round's data, instead of missing the deadline and being restarted."""
    if not deadline_s or step_s is None or step_s <= 0 or other_s + steps * step_s <= share * deadline_s:
        return steps
    return max(1, min(steps, int((share * deadline_s - other_s) / step_s)))
