"""The Flower ClientApp: a node's LTE heads, stacked, per message (and the full-model FedAvg
baseline client).

A TRAIN message for LTE names the heads to train and carries q(W), the merged replicas and the
run spec (protocol.py); the config's "sources" say where each head's state comes from (see
strategies/lte_strategy.py). The node holds the quantized base once and its k heads stacked on
it (lte_fed/node.py). It keeps each head (A, B, V) and its AdamW moments between rounds on disk,
under its state dir (node config
`state-dir`; in simulation `<run dir>/client-state`), by run id, head and round, in safetensors:
a restarted node, or a resumed server, finds it there.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lte_fed import protocol as P
from lte_fed.job import batch_source, lte_config, setup
from lte_fed.lte import StackedLTE
from lte_fed.node import head_optimizer_state, load_head_optimizer_states, train_heads
from lte_fed.rundir import CLIENT_STATE
from lte_fed.spec import Spec
from lte_fed.train import (load_optimizer_tensors, lr_at, make_optimizer, optimizer_tensors, prefixed, train_head,
                           unprefixed)

log = logging.getLogger("lte_fed.client")
app = ClientApp()


class ClientConfigError(ValueError):
    """A message or node config without a key the client needs; the message names it."""


def _need(record, key: str, where: str):
    if key not in record:
        raise ClientConfigError(f"{where} lacks {key!r}")
    return record[key]


# Ray actors and SuperNode processes live across rounds: keep the data and models built once.
@lru_cache(maxsize=2)
def _job(spec_json: str):
    spec = Spec.from_dict(P.spec_from_json(spec_json))
    job = setup(spec)
    return spec, job, batch_source(job)


def node_capacity(node_config) -> dict:
    """What this node tells the server (node ids are random per run): its partition-id (the
    order nodes are filled in) and what it declares it can carry: `heads`, `rank`, `memory-gb`
    (0 where not declared)."""
    out = {"partition-id": int(_need(node_config, "partition-id", "node config"))}
    for key, kind in (("heads", int), ("rank", int), ("memory-gb", float)):
        value = node_config.get(key, 0)
        try:
            out[key] = kind(value)
        except (TypeError, ValueError):
            raise ClientConfigError(f"node config {key}={value!r} is not a number") from None
        if out[key] < 0:
            raise ClientConfigError(f"node config {key}={value!r} must be >= 0")
    return out


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition and capacity (`node_capacity`)."""
    return Message(RecordDict({P.CONFIG: ConfigRecord(node_capacity(context.node_config))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _need(msg.content, P.CONFIG, "train message")
    spec_json = _node_spec_json(str(_need(config, "spec", "train config")), context.node_config)
    spec = Spec.from_dict(P.spec_from_json(spec_json))
    if spec.method == "fedavg":
        return _train_fedavg(msg, context, spec_json, spec)
    return _train_lte(msg, context, spec_json, spec, config)


def _node_spec_json(spec_json: str, node_config) -> str:
    """A deployed node's own `data-root` (node config) overrides the run's data.root: each
    device keeps its copy of the data wherever it likes."""
    root = node_config.get("data-root")
    if not root:
        return spec_json
    d = P.spec_from_json(spec_json)
    d["data"]["root"] = str(root)
    return P.spec_to_json(d)


# ------------------------------------------------------------------------------------ LTE
def _train_lte(msg: Message, context: Context, spec_json: str, spec: Spec, config) -> Message:
    """Train this node's heads (config "heads") stacked on one q(W); reply one record pair per head."""
    heads = [int(h) for h in _need(config, "heads", "train config")]
    sources, committed = list(_need(config, "sources", "train config")), list(_need(config, "committed", "train config"))
    rnd, state_round = int(_need(config, "round", "train config")), int(_need(config, "state_round", "train config"))
    start, steps = int(_need(config, "start_step", "train config")), int(_need(config, "steps", "train config"))
    ranks = [int(r) for r in _need(config, "ranks", "train config")]
    _, job, src = _job(spec_json)
    model = _node_model(spec_json, tuple(heads), tuple(ranks))
    opt = make_optimizer(model.head_params(), spec.lr, spec.train.weight_decay)
    run_id = str(_need(config, "run_id", "train config"))
    stores = [StateFiles(context, spec, run_id, f"head-{h}") for h in heads]
    restore = msg.content[P.RESTORE].to_torch_state_dict() if P.RESTORE in msg.content else {}
    opt_states = [_load_head(model, i, stores[i], sources[i], bool(committed[i]), unprefixed(str(h), restore),
                             state_round) for i, h in enumerate(heads)]
    cuts = [model.head_cuts(i) for i in range(len(heads))]
    load_head_optimizer_states(opt, model.head_params(), opt_states, cuts)
    model.load_base_state(_need(msg.content, P.BASE, "train message").to_torch_state_dict())
    model.load_replicas(_need(msg.content, P.REPLICAS, "train message").to_torch_state_dict())

    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    t0 = time.perf_counter()
    losses = train_heads(model, opt, src, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                         precision=spec.run.precision)
    train_s = time.perf_counter() - t0
    keep_from = int(config.get("keep_from", 0))
    for i, store in enumerate(stores):
        store.save(P.wire(model.head_state(i, with_corr=True)), head_optimizer_state(opt, i, cuts[i]), rnd, keep_from)
    pid = int(context.node_config.get("partition-id", -1))
    records = {}
    for i, h in enumerate(heads):
        records[P.head_record(h)] = ArrayRecord(P.wire(_inject_fault(spec, h, rnd, model.head_state(i))))
        records[P.metrics_record(h)] = MetricRecord({
            "head": h, "partition": pid, "train_loss": sum(l[i] for l in losses) / len(losses), "steps": steps,
            "num-examples": steps * src.per_head_batch, "train_s": train_s})
    _slow_down(spec, heads, rnd, train_s)
    return Message(RecordDict(records), reply_to=msg)


@lru_cache(maxsize=2)
def _node_model(spec_json: str, heads: tuple[int, ...], ranks: tuple[int, ...]) -> StackedLTE:
    """This node's heads (each at its own rank) stacked on one base; built once per set of heads,
    their states load every round."""
    spec, job, _ = _job(spec_json)
    model = StackedLTE(job.plain, lte_config(spec), list(heads), list(ranks)).to(job.device)
    model.init_state = [{k: t.clone() for k, t in model.head_state(i, with_corr=True).items()} for i in range(len(heads))]
    return model


def _load_head(model: StackedLTE, i: int, store: "StateFiles", source: str, committed: bool,
               restore: dict[str, torch.Tensor], state_round: int) -> dict[str, torch.Tensor] | None:
    """Head slice i's state as the server's "source" says (strategies/lte_strategy.py); returns
    its saved optimizer state, if it has one."""
    if source == "fresh":  # never trained: its init, drawn from (seed, head)
        model.load_head_state(i, model.init_state[i])
        return None
    if source in ("local", "local-or-restore"):
        saved = store.load(state_round)
        if saved is not None:
            model.load_head_state(i, unprefixed("head", saved))
            if committed:
                model.commit_head(i)  # our last update is in W now: V <- B A (exact) or B <- 0
            return unprefixed("opt", saved)
    if source in ("restore", "local-or-restore") and restore:
        model.load_head_state(i, restore)  # as of its last merge; AdamW anew
        return None
    raise ClientConfigError(f"{store.name}: no saved state for round {state_round} on this node "
                            f"and no {P.RESTORE!r} record (source {source!r})")


def _fault_matches(spec: Spec, head: int, rnd: int) -> str | None:
    """The fault kind of run.fault=KIND:HEAD:ROUND if it is for `head` in round `rnd`."""
    if not spec.run.fault:
        return None
    kind, h, r = spec.run.fault.split(":")
    return kind if int(h) == head and (r == "*" or int(r) == rnd) else None


def _inject_fault(spec: Spec, head: int, rnd: int, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """run.fault=KIND:HEAD:ROUND (a testing aid): misbehave as a broken or vanished worker."""
    kind = _fault_matches(spec, head, rnd)
    if kind is None or kind.startswith("slow"):
        return reply
    log.warning("injecting fault %r for head %d in round %d", kind, head, rnd)
    key = next(k for k in reply if k.endswith("lora_B"))
    if kind == "raise":
        raise RuntimeError(f"injected fault: head {head} fails in round {rnd}")
    if kind == "nan":
        return reply | {key: torch.full_like(reply[key], float("nan"))}
    if kind == "shape":
        return reply | {key: reply[key][:-1].clone()}
    time.sleep(spec.run.round_timeout + 3)  # "hang": the server has given up on us by now
    return reply


def _slow_down(spec: Spec, heads: list[int], rnd: int, train_s: float) -> None:
    """run.fault=slow<F>:HEAD:ROUND: the node holding HEAD answers F x its training time late
    (a slow device; the round deadline's test case)."""
    for h in heads:
        kind = _fault_matches(spec, h, rnd)
        if kind is not None and kind.startswith("slow"):
            time.sleep(float(kind[4:]) * train_s)
            return


class StateFiles:
    """One worker's state between rounds (a head's factors, or a FedAvg worker's nothing, plus
    its AdamW moments) as `<state dir>/<run id>/<name>-r<round>.safetensors`.

    Keyed by run id, so a state dir shared by several runs never feeds one run another's state.
    Rounds from `keep_from` (the server's last checkpoint) on are kept: a server resumed from
    that checkpoint asks for exactly that round.
    """

    def __init__(self, context: Context, spec: Spec, run_id: str, name: str):
        root = context.node_config.get("state-dir") or (Path(spec.run.out) / CLIENT_STATE if spec.run.out else None)
        if not root:
            raise ClientConfigError("no state dir: set node config 'state-dir' (or run.out in simulation)")
        if not run_id or not all(c.isalnum() or c in "-_" for c in run_id):
            raise ClientConfigError(f"bad run id {run_id!r} in the train config")
        self.dir, self.name = Path(str(root)) / run_id, name

    def _file(self, rnd: int) -> Path:
        return self.dir / f"{self.name}-r{rnd}.safetensors"

    def save(self, tensors: dict[str, torch.Tensor], opt: dict[str, torch.Tensor], rnd: int, keep_from: int) -> None:
        """Save `tensors` and the optimizer state `opt` (flat tensors) as round `rnd`'s."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        flat = {k: t.contiguous() for k, t in (prefixed("head", tensors) | prefixed("opt", opt)).items()}
        tmp = self._file(rnd).with_suffix(".tmp")
        save_file(flat, str(tmp), metadata={"round": str(rnd)})
        tmp.replace(self._file(rnd))
        for old in self.dir.glob(f"{self.name}-r*.safetensors"):
            k = old.name[len(self.name) + 2:-len(".safetensors")]
            if k.isdigit() and int(k) < min(keep_from, rnd):
                old.unlink(missing_ok=True)

    def load(self, rnd: int) -> dict[str, torch.Tensor] | None:
        """The state saved at the end of round `rnd`, or None if this node has none."""
        from safetensors.torch import load_file

        if not self._file(rnd).exists():
            return None
        log.info("%s: state of round %d loaded from %s", self.name, rnd, self._file(rnd))
        return load_file(str(self._file(rnd)))


# ------------------------------------------------------------------------------- FedAvg
def _train_fedavg(msg: Message, context: Context, spec_json: str, spec: Spec) -> Message:
    """Full-model baseline: T local AdamW steps of the whole plain model on this worker's shard."""
    config = _need(msg.content, P.CONFIG, "train message")
    worker, rnd = int(_need(config, "head", "train config")), int(_need(config, "round", "train config"))
    _, job, src = _job(spec_json)
    model = _plain_model(spec_json)
    model.load_state_dict(_need(msg.content, P.WEIGHTS, "train message").to_torch_state_dict())
    opt = make_optimizer(list(model.parameters()), spec.lr, spec.train.weight_decay)
    store = StateFiles(context, spec, str(_need(config, "run_id", "train config")), f"worker-{worker}")
    saved = store.load(int(_need(config, "state_round", "train config")))
    if saved is not None:
        load_optimizer_tensors(opt, unprefixed("opt", saved))
    start = (rnd - 1) * spec.merge_every
    steps = min(spec.merge_every, spec.train.steps - start)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    losses = train_head(model, opt, src, worker, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                        precision=spec.run.precision)
    store.save({}, optimizer_tensors(opt), rnd, int(config.get("keep_from", 0)))
    metrics = {"head": worker, "train_loss": sum(losses) / len(losses), "num-examples": steps * src.per_head_batch}
    return Message(RecordDict({P.WEIGHTS: ArrayRecord(P.wire(model.state_dict())), P.METRICS: MetricRecord(metrics)}),
                   reply_to=msg)


@lru_cache(maxsize=2)
def _plain_model(spec_json: str):
    import copy

    _, job, _ = _job(spec_json)
    return copy.deepcopy(job.plain).to(job.device)
