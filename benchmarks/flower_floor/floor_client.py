"""The floor app's client: replies at once with `arrays` float32 arrays of `values` values each
(the shape of a node's reply)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    arrays = {f"a{i}": Array(np.zeros(int(cfg["values"]), np.float32)) for i in range(int(cfg["arrays"]))}
    return Message(RecordDict({"arrays": ArrayRecord(arrays)}), reply_to=msg)
