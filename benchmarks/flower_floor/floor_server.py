"""The floor app's server: per round, one message to every node (`down_values` float32 values;
0: a config only) and every reply pulled back,
with lte-fed's own `send_and_receive` (so the polling is the one our rounds use); the round
times go to the run config's `out` as JSON."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from strategies.grid_utils import send_and_receive, wait_for_nodes

app = ServerApp()


def _down(values: int) -> ArrayRecord:
    """What the server sends each node: one float32 array of `values` values (0: none)."""
    return ArrayRecord({"a0": Array(np.zeros(values, np.float32))} if values else {})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["nodes"])
    wait_for_nodes(grid, nodes, 120)
    times = []
    for rnd in range(int(cfg["rounds"])):
        t0 = time.perf_counter()
        ask = ConfigRecord({"arrays": int(cfg["arrays"]), "values": int(cfg["values"])})
        msgs = [Message(RecordDict({"config": ask, "down": _down(int(cfg["down_values"]))}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in sorted(grid.get_node_ids())]
        replies = send_and_receive(grid, msgs, 120)
        if len(replies) != len(msgs) or any(r.has_error() for r in replies):
            raise RuntimeError(f"round {rnd}: {len(replies)} of {len(msgs)} replies, errors: "
                               f"{[r.error.reason for r in replies if r.has_error()]}")
        times.append(time.perf_counter() - t0)
    with open(str(cfg["out"]), "w") as f:
        json.dump(times, f)
