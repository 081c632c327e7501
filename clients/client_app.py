"""The Flower ClientApp: a node's LTE heads, stacked, per message (and the full-model FedAvg
baseline client).

A TRAIN message for LTE names the heads this node trains and carries q(W), the merged replicas
and the run spec (protocol.py); the config's "sources" say where each head's state comes from
(see strategies/lte_strategy.py). The node holds the quantized base once and its k heads stacked
on it (lte_fed/node.py); the stacked model is built on the meta device and filled from the
message (lte_fed/worker.py), so W never exists here in full precision. Each head's reply metrics
say what the node's message cost (lte_fed/costs.py; one message, the same costs in every head's
record). It keeps each head (A, B, V), its AdamW moments and its uplink error-feedback residual
between rounds on disk, under its state dir (node config
`state-dir`; in simulation `<run dir>/client-state`), by run id, head and round, in safetensors:
a restarted node, or a resumed server, finds it there.
"""

from __future__ import annotations

import time

_IMPORT_T0 = time.perf_counter()  # the module's own imports are part of a message's cost

import copy  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from lte_fed import costs  # noqa: E402
from lte_fed import protocol as P  # noqa: E402
from lte_fed import uplink  # noqa: E402
from lte_fed import worker as W  # noqa: E402
from lte_fed.lte import StackedLTE  # noqa: E402
from lte_fed.node import head_optimizer_state, load_head_optimizer_states, train_heads  # noqa: E402
from lte_fed.rundir import CLIENT_STATE  # noqa: E402
from lte_fed.spec import Spec  # noqa: E402
from lte_fed.train import (load_optimizer_tensors, lr_at, make_optimizer, optimizer_tensors, prefixed,  # noqa: E402
                           train_head, unprefixed)

IMPORTS_S = time.perf_counter() - _IMPORT_T0
log = logging.getLogger("lte_fed.client")
app = ClientApp()
_served = 0  # messages this process handled: only the first pays the start-up
MMAP_THRESHOLD_MIB = 8.0  # node config mmap-threshold-mib's default (use_mmap_threshold)


class ClientConfigError(ValueError):
    """A message or node config without a key the client needs; the message names it."""


def _need(record, key: str, where: str):
    if key not in record:
        raise ClientConfigError(f"{where} lacks {key!r}")
    return record[key]


# Simulation's Ray actors live across rounds: keep the shards (and their jobs) once read, one per
# head a node trains. A deployed SuperNode runs every message in a fresh process, which reads the
# shards from its state dir.
@lru_cache(maxsize=16)
def _node_data(spec_json: str, head: int, cache: str | None):
    return W.node_data(Spec.from_dict(P.spec_from_json(spec_json)), head, cache)


def _start_costs() -> tuple[costs.Stopwatch, dict]:
    """A stopwatch for this message, and its start-up costs (only a process's first message)."""
    global _served
    first, _served = _served == 0, _served + 1
    return costs.Stopwatch(), {"start_s": round(costs.process_age_s(), 3) if first else 0.0,
                               "imports_s": round(IMPORTS_S, 3) if first else 0.0,
                               "rss_entry_mib": round(costs.status_kib("VmHWM") / 1024, 1)}


def node_capacity(node_config) -> dict:
    """What this node tells the server (node ids are random per run): its partition-id (the
    order nodes are filled in) and what it declares it can carry: `heads`, `rank`, `memory-gb`
    (0 where not declared)."""
    _need(node_config, "partition-id", "node config")
    out = {"partition-id": node_number(node_config, "partition-id")}
    for key, kind in (("heads", int), ("rank", int), ("memory-gb", float)):
        out[key] = node_number(node_config, key, kind)
    return out


def node_number(node_config, key: str, kind: type = int, default: float = 0, most: float | None = None):
    """Node config `key` as `kind`, >= 0 (and <= `most`), `default` where absent; a bad value is a
    ClientConfigError naming the key."""
    value = node_config.get(key, default)
    try:
        if isinstance(value, bool):  # partition-id=true would be read as 1
            raise TypeError
        number = kind(value)
        whole = kind is not int or float(value) == number  # int(2.5) would be 2, silently
    except (TypeError, ValueError, OverflowError):
        raise ClientConfigError(f"node config {key}={value!r} is not a number") from None
    if not whole:
        raise ClientConfigError(f"node config {key}={value!r} is not a whole number")
    if not math.isfinite(number):
        raise ClientConfigError(f"node config {key}={value!r} is not a finite number")
    if number < 0 or most is not None and number > most:
        bounds = ">= 0" if most is None else f"in [0, {most}]"
        raise ClientConfigError(f"node config {key}={value!r} must be {bounds}")
    return number


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition and capacity (`node_capacity`), and this process's
    peak memory: deployed, a ClientApp process with no job (Flower's runtime and this app's
    imports), the floor every training message's process starts from."""
    idle = {"rss_peak_mib": costs.peak_memory()["rss_peak_mib"]}
    return Message(RecordDict({P.CONFIG: ConfigRecord(node_capacity(context.node_config) | idle)}), reply_to=msg)


def use_threads(node_config) -> int:
    """Node config `threads`: the torch threads this node's ClientApp computes with (absent or 0:
    torch's default, every core). Several SuperNodes on one machine must split its cores: each
    message's process would otherwise start one thread per core, and OpenMP threads that
    outnumber the cores spin while they wait for each other (measured with 2 nodes on 2 cores:
    the model build 9.5 s instead of 1.7 s, docs/performance.md §4)."""
    n = node_number(node_config, "threads")
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def use_mmap_threshold(node_config) -> bool:
    """Node config `mmap-threshold-mib` (default 8; 0: glibc's own moving threshold): blocks this
    large or larger get their own mmap, so the dequantized tiles of a quantized base do not
    fragment the heap (lte_fed/costs.py `pin_mmap_threshold`); whether it was applied."""
    # 32: glibc's own ceiling for the threshold on 64-bit
    mib = node_number(node_config, "mmap-threshold-mib", float, MMAP_THRESHOLD_MIB, most=32)
    if 0 < mib < 1 / 16:  # every block above a few bytes its own mmap: each allocation a system call
        raise ClientConfigError(f"node config mmap-threshold-mib={mib!r} must be 0 (glibc's own) or in [0.0625, 32]")
    return bool(mib) and costs.pin_mmap_threshold(int(mib * 2**20))


@app.train()
def train(msg: Message, context: Context) -> Message:
    use_threads(context.node_config)
    use_mmap_threshold(context.node_config)
    config = _need(msg.content, P.CONFIG, "train message")
    spec_json = _node_spec_json(str(_need(config, "spec", "train config")), context.node_config)
    spec = Spec.from_dict(P.spec_from_json(spec_json))
    if spec.method == "fedavg":
        return _train_fedavg(msg, context, spec_json, spec)
    return _train_lte(msg, context, spec_json, spec, config)


def _same_data(config, job) -> None:
    """ClientConfigError unless this node's copy of the data is the server's (its hash, the
    train config's "data_id"): a node whose data-root held other images or labels trained on
    them and was merged as if they were the run's."""
    want = config.get("data_id")
    if want is not None and job.data_id != want:
        raise ClientConfigError(f"this node's data differs from the server's (data.root={job.spec.data.root!r}; "
                                f"hash {job.data_id[:12]} here, {str(want)[:12]} on the server): every node must "
                                "hold a copy of the run's data set (node config data-root)")


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
    watch, cost = _start_costs()
    heads = [int(h) for h in _need(config, "heads", "train config")]
    sources, committed = list(_need(config, "sources", "train config")), list(_need(config, "committed", "train config"))
    rnd, state_round = int(_need(config, "round", "train config")), int(_need(config, "state_round", "train config"))
    start, steps = int(_need(config, "start_step", "train config")), int(_need(config, "steps", "train config"))
    ranks = [int(r) for r in _need(config, "ranks", "train config")]
    run_id = str(_need(config, "run_id", "train config"))
    stores = [StateFiles(context, spec, run_id, f"head-{h}") for h in heads]
    with watch("libs"):
        W.job_imports(spec)
    with watch("data"):
        job, src = W.node_sources(spec, heads, str(stores[0].root),
                                  data=lambda _spec, h, cache: _node_data(spec_json, h, cache))
        _same_data(config, job)
    with watch("model"):
        replicas = P.unpack_wire(_need(msg.content, P.REPLICAS, "train message").to_torch_state_dict())
        model, built = _node_model(job, spec_json, heads, ranks, msg, replicas, cost)
        opt = make_optimizer(model.head_params(), spec.lr, spec.train.weight_decay)
        restore = P.unpack_wire(msg.content[P.RESTORE].to_torch_state_dict()) if P.RESTORE in msg.content else {}
        if not built:  # a kept model: slice i becomes head h as a fresh build would have it
            for i, h in enumerate(heads):
                model.reset_head(i, h, draw=sources[i] == "fresh")
        loaded = [_load_head(model, i, stores[i], sources[i], bool(committed[i]), unprefixed(str(h), restore),
                             state_round) for i, h in enumerate(heads)]
        cuts = [model.head_cuts(i) for i in range(len(heads))]
        load_head_optimizer_states(opt, model.head_params(), [o for o, _, _ in loaded], cuts)
        # the state files' tensors are views of one buffer per file: keep copies of the residuals
        # only, so the files' moments (a second set of AdamW state) do not live through training
        resids = [{k: t.clone() for k, t in r.items()} for _, r, _ in loaded]
        lost = [why for _, _, why in loaded]
        model.load_replicas(replicas)
        del replicas, restore, loaded
        _drop_arrays(msg, P.BASE, P.REPLICAS, P.RESTORE)
        # a compressed uplink sends each head's change over the round (fp32 sends the head itself)
        began = [{k: t.clone() for k, t in model.head_state(i).items()} if spec.comm.up != "fp32" else {}
                 for i in range(len(heads))]

    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    # what the node declares, in every reply: a node restarted with another node config since
    # the server's QUERY (a value gone bad there is named too)
    node = node_capacity(context.node_config)
    pid = node["partition-id"]
    with watch("train"):
        t0 = time.perf_counter()
        losses = train_heads(model, opt, src, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                             precision=spec.run.precision)
        # run.fault=slow...: a slower device, so the delay counts as training (the reply's train_s,
        # from which the server paces the node under a deadline, run.deadline_steps)
        _slow_down(spec, heads, pid, rnd, time.perf_counter() - t0)
    costs.trim_heap()  # the reply's packed arrays are mapped afresh: not on top of the step's freed heap
    keep_from = int(config.get("keep_from", 0))
    with watch("reply"):
        payloads = []
        for i, store in enumerate(stores):
            payload, resid = _uplink_payload(spec.comm.up, model.head_state(i), began[i], resids[i])
            store.save(P.wire(model.head_state(i, with_corr=True)), head_optimizer_state(opt, i, cuts[i]), rnd,
                       keep_from, resid=resid)
            payloads.append(payload)
        replies = [P.wire(_inject_fault(spec, h, rnd, payloads[i])) for i, h in enumerate(heads)]
    message_costs = _costs(watch, cost)
    records = {}
    for i, h in enumerate(heads):
        records[P.head_record(h)] = ArrayRecord(replies[i])
        records[P.metrics_record(h)] = MetricRecord({
            "head": h, "partition": pid, "node_heads": node["heads"], "node_rank": node["rank"],
            "node_memory_gb": node["memory-gb"], "train_loss": sum(l[i] for l in losses) / len(losses), "steps": steps,
            "num-examples": steps * src.per_head_batch, **message_costs,
            **({P.STATE_LOST: 1} if lost[i] else {})})
    _keep_node_model(spec_json, ranks, job.device, model)
    return Message(RecordDict(records), reply_to=msg)


def _drop_arrays(msg: Message, *keys: str) -> None:
    """Drop the TRAIN message's arrays once they are in the model: a deployed ClientApp's only
    other reference to them is Flower's, which keeps the message (its metadata is what the reply
    needs) until the process ends, so they would sit in memory through training, a second copy
    of the weights the node holds."""
    for key in keys:
        msg.content.pop(key, None)


def _costs(watch: costs.Stopwatch, cost: dict) -> dict:
    return {**cost, **{k: round(v, 3) for k, v in watch.laps.items()}, **costs.peak_memory()}


# A process that serves several messages (simulation's Ray actors) keeps its last node model and
# reuses it for the next message with the same spec and ranks, whatever heads that names: building
# one (skeleton copy, LoRA surgery, drawing every A) costs as much as a few training steps. Every
# message overwrites all of it: q(W) and replicas from the message, each slice from its source
# (`reset_head` first). One model at most: a process holds one node's memory. A deployed node runs
# each message in a fresh process and always builds.
_KEPT: dict[tuple, StackedLTE] = {}


def _model_key(spec_json: str, ranks: list[int], device) -> tuple:
    return spec_json, tuple(ranks), str(device)


def _keep_node_model(spec_json: str, ranks: list[int], device, model: StackedLTE) -> None:
    _KEPT.clear()
    _KEPT[_model_key(spec_json, ranks, device)] = model


def _node_model(job, spec_json: str, heads: list[int], ranks: list[int], msg: Message, replicas: dict,
                cost: dict) -> tuple[StackedLTE, bool]:
    """The node's heads (each at its own rank) stacked on the job's skeleton, filled with the
    message's q(W) and replicas, and whether it was built now (else: kept from the last message,
    its slices still to be reset); whether any full-precision W was created meanwhile goes into
    `cost` (a quantized base only: with quant.base=none the node holds W by choice)."""
    base = P.unpack_wire(_need(msg.content, P.BASE, "train message").to_torch_state_dict())
    quantized = job.spec.quant.base != "none"
    # popped, not read: a second handler running meanwhile in this process builds its own
    model = _KEPT.pop(_model_key(spec_json, ranks, job.device), None)
    built = model is None
    shapes = W.watched(W.lora_shapes_of(job) if built else W.lora_shapes(model), ranks) if quantized else set()
    with W.FullWeightWatch(shapes) as seen:
        if built:
            model = W.node_model(dataclasses.replace(job, plain=copy.deepcopy(job.plain)), heads, ranks)  # meta: free
        W.fill_node(model, base, replicas)
    cost["full_weights"] = seen.count if quantized else -1
    if seen.count:
        log.error("heads %s: the model's build created full-precision W: %s", heads, seen.seen)
    return model.to(job.device), built


def _uplink_payload(fmt: str, end: dict, start: dict, resid: dict) -> tuple[dict, dict]:
    """What to send for comm.up=`fmt` and the residual to keep (lte_fed/uplink.py)."""
    if fmt == "fp32":
        return uplink.encode(end, fmt), {}
    return uplink.ef_step(end, start, resid, fmt)


def _load_head(model: StackedLTE, i: int, store: "StateFiles", source: str, committed: bool,
               restore: dict[str, torch.Tensor], state_round: int
               ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], str | None]:
    """Head slice i's state as the server's "source" says (strategies/lte_strategy.py); returns
    its saved optimizer state, if it has one, the uplink's error-feedback residual saved with
    it ({} when the head starts anew: from its init or the server's copy), and why a saved state
    this node should have had could not be used (None if nothing was lost)."""
    if source == "fresh":  # never trained: as built, A drawn from (seed, head), B and V zero
        return None, {}, None
    lost = None
    if source in ("local", "local-or-restore"):
        try:
            saved = store.load(state_round)
        except ValueError as e:
            if source == "local" or not restore:
                raise
            lost = f"{e}; {store.name} starts from the server's copy instead"  # as if the file were lost
            log.warning("%s", lost)
            saved = None
        if saved is not None:
            model.load_head_state(i, unprefixed("head", saved))
            if committed:
                model.commit_head(i)  # our last update is in W now: V <- B A (exact) or B <- 0
            return unprefixed("opt", saved), unprefixed("resid", saved), None
    if source in ("restore", "local-or-restore") and restore:
        model.load_head_state(i, restore)  # as of its last merge; AdamW anew
        return None, {}, lost
    raise ClientConfigError(f"{store.name}: no saved state for round {state_round} on this node "
                            f"and no {P.RESTORE!r} record (source {source!r})")


def _fault_matches(spec: Spec, head: int, rnd: int) -> str | None:
    """The fault kind of run.fault=KIND:HEAD:ROUND if it is for `head` in round `rnd`."""
    if not spec.run.fault:
        return None
    kind, h, r = spec.run.fault.split(":")
    return kind if h.isdigit() and int(h) == head and (r == "*" or int(r) == rnd) else None


def _inject_fault(spec: Spec, head: int, rnd: int, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """run.fault=KIND:HEAD:ROUND (a testing aid): misbehave as a broken or vanished worker."""
    kind = _fault_matches(spec, head, rnd)
    if kind is None or kind.startswith("slow"):
        return reply
    log.warning("injecting fault %r for head %d in round %d", kind, head, rnd)
    key = next(k for k in reply if k in ("values", "delta", "scale"))  # the packed array (uplink.py)
    if kind == "raise":
        raise RuntimeError(f"injected fault: head {head} fails in round {rnd}")
    if kind == "nan":
        return reply | {key: torch.full_like(reply[key], float("nan"))}
    if kind == "shape":
        return reply | {key: reply[key][:-1].clone()}
    time.sleep(spec.run.round_timeout + 3)  # "hang": the server has given up on us by now
    return reply


def _slow_down(spec: Spec, heads: list[int], partition: int, rnd: int, train_s: float) -> float:
    """run.fault=slow<F>:HEAD:ROUND: the node holding HEAD trains F x its training time longer;
    slow<F>:node<P>:ROUND: the node of partition-id P does, whatever heads it holds (a slow
    device: the round deadline's test case). Returns the seconds slept."""
    if not spec.run.fault or not spec.run.fault.startswith("slow"):
        return 0.0
    kind, who, r = spec.run.fault.split(":")
    if (r == "*" or int(r) == rnd) and (who == f"node{partition}" or who.isdigit() and int(who) in heads):
        late = float(kind[4:]) * train_s
        log.warning("run.fault=%s: node of partition %d answers %.2f s late in round %d", spec.run.fault,
                    partition, late, rnd)
        time.sleep(late)
        return late
    return 0.0


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
        self.root = Path(str(root))
        self.dir, self.name = self.root / run_id, name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClientConfigError(f"state dir {self.root}: cannot keep this node's state there ({e.strerror}: "
                                    f"{e.filename}); set node config 'state-dir' to a writable folder") from None

    def _file(self, rnd: int) -> Path:
        return self.dir / f"{self.name}-r{rnd}.safetensors"

    def save(self, tensors: dict[str, torch.Tensor], opt: dict[str, torch.Tensor], rnd: int, keep_from: int,
             resid: dict[str, torch.Tensor] | None = None) -> None:
        """Save `tensors`, the optimizer state `opt` (flat tensors) and `resid` (the compressed
        uplink's error-feedback residual, kept with the head) as round `rnd`'s."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        flat = prefixed("head", tensors) | prefixed("opt", opt) | prefixed("resid", P.wire(resid or {}))
        packed, layout = P.pack_tensors(flat)
        tmp = self._file(rnd).with_suffix(".tmp")
        try:
            save_file(packed, str(tmp), metadata={"round": str(rnd), "name": self.name, "run_id": self.dir.name,
                                                  LAYOUT: layout})
            tmp.replace(self._file(rnd))
        except Exception as e:  # noqa: BLE001 -- a full disk, or a folder where the file goes: name the file
            if tmp.is_file():
                tmp.unlink()
            raise OSError(f"{self._file(rnd)}: cannot save this node's state there ({type(e).__name__}: {e})") from None
        for old in self.dir.glob(f"{self.name}-r*.safetensors"):
            k = old.name[len(self.name) + 2:-len(".safetensors")]
            if k.isdigit() and int(k) < min(keep_from, rnd) and old.is_file():  # not what someone put there
                old.unlink(missing_ok=True)

    def load(self, rnd: int) -> dict[str, torch.Tensor] | None:
        """The state saved at the end of round `rnd`, or None if this node has none."""
        from safetensors import safe_open

        path = self._file(rnd)
        if not path.exists():
            return None
        log.info("%s: state of round %d loaded from %s", self.name, rnd, path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                stored = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 -- truncated or overwritten (a full disk, a crash): say which file
            raise ValueError(f"{path}: not a readable state file ({type(e).__name__}: {e})") from None
        # a file copied or renamed onto this name holds another head's, round's or run's state
        # (files written before these keys were recorded have none of them)
        for key, want in (("name", self.name), ("round", str(rnd)), ("run_id", self.dir.name)):
            if key in meta and meta[key] != want:
                raise ValueError(f"{path}: holds the state of {key} {meta[key]!r}, not {want!r}")
        layout = meta.get(LAYOUT)
        try:  # files without a layout hold one tensor per name (written before packing)
            return stored if layout is None else P.unpack_tensors(stored, layout)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: the saved state does not match its layout ({e})") from None


LAYOUT = "layout"  # a state file's metadata key: where each tensor lies in the packed buffers (protocol.py)


# ------------------------------------------------------------------------------- FedAvg
def _train_fedavg(msg: Message, context: Context, spec_json: str, spec: Spec) -> Message:
    """Full-model baseline: T local AdamW steps of the whole plain model on this worker's shard."""
    watch, cost = _start_costs()
    config = _need(msg.content, P.CONFIG, "train message")
    worker, rnd = int(_need(config, "head", "train config")), int(_need(config, "round", "train config"))
    store = StateFiles(context, spec, str(_need(config, "run_id", "train config")), f"worker-{worker}")
    with watch("libs"):
        W.job_imports(spec)
    with watch("data"):
        job, src = _node_data(spec_json, worker, str(store.root))
        _same_data(config, job)
    with watch("model"):
        # the received weights become the model's own (no random model is built first)
        model = W.plain_model(dataclasses.replace(job, plain=copy.deepcopy(job.plain)),  # meta: a free copy
                              _need(msg.content, P.WEIGHTS, "train message").to_torch_state_dict())
        opt = make_optimizer(list(model.parameters()), spec.lr, spec.train.weight_decay)
        saved = store.load(int(_need(config, "state_round", "train config")))
        if saved is not None:
            load_optimizer_tensors(opt, unprefixed("opt", saved))
        _drop_arrays(msg, P.WEIGHTS)
    cost["full_weights"] = -1  # FedAvg trains W itself
    start = (rnd - 1) * spec.merge_every
    steps = min(spec.merge_every, spec.train.steps - start)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    with watch("train"):
        losses = train_head(model, opt, src, worker, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                            precision=spec.run.precision)
    costs.trim_heap()
    with watch("reply"):
        store.save({}, optimizer_tensors(opt), rnd, int(config.get("keep_from", 0)))
        reply = P.wire(model.state_dict())
    metrics = {"head": worker, "train_loss": sum(losses) / len(losses), "num-examples": steps * src.per_head_batch,
               **_costs(watch, cost)}
    return Message(RecordDict({P.WEIGHTS: ArrayRecord(reply), P.METRICS: MetricRecord(metrics)}), reply_to=msg)

