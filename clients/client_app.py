"""The Flower ClientApp: one LTE head per message (and the full-model FedAvg baseline client).

A TRAIN message for LTE names the head to train and carries q(W), the merged replicas and the
run spec (protocol.py). The worker holds only the quantized base and that head; it keeps the
head (A, B, V) and its AdamW state between rounds in `context.state` and, on a deployed node
with `state-dir` in its node config, on disk too (so a restarted SuperNode gets its head back).
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
from lte_fed.lte import HeadLTE
from lte_fed.spec import Spec
from lte_fed.train import lr_at, make_optimizer, train_head

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


@lru_cache(maxsize=8)
def _head_model(spec_json: str, head: int) -> HeadLTE:
    spec, job, _ = _job(spec_json)
    model = HeadLTE(job.plain, lte_config(spec), head).to(job.device)
    model.init_state = {k: t.clone() for k, t in model.head_state(with_corr=True).items()}
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    pid = int(_need(context.node_config, "partition-id", "node config"))
    return Message(RecordDict({P.CONFIG: ConfigRecord({"partition-id": pid})}), reply_to=msg)


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
    head = int(_need(config, "head", "train config"))
    start, steps = int(_need(config, "start_step", "train config")), int(_need(config, "steps", "train config"))
    _, job, src = _job(spec_json)
    model = _head_model(spec_json, head)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], spec.lr, spec.train.weight_decay)
    store = _HeadStore(context, spec, head)
    rnd = int(_need(config, "round", "train config"))

    if P.RESTORE in msg.content:  # taking the head over: its state as of its last merge
        model.load_head_state(msg.content[P.RESTORE].to_torch_state_dict())
    elif bool(config.get("fresh", False)):  # never trained: its init, drawn from (seed, head)
        model.load_head_state(model.init_state)
    elif not store.load(model, opt, int(_need(config, "state_round", "train config"))):
        raise ClientConfigError(f"no saved state of head {head} on this node and no 'restore' in the message")
    if bool(_need(config, "committed", "train config")):
        model.commit_merge()  # our last contribution is in W now: V <- B A (exact) or B <- 0
    model.load_base_state(_need(msg.content, P.BASE, "train message").to_torch_state_dict())
    model.load_head_state(_need(msg.content, P.REPLICAS, "train message").to_torch_state_dict())

    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    losses = train_head(model, opt, src, head, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                        precision=spec.run.precision)
    store.save(model, opt, rnd)

    reply = _inject_fault(spec, head, rnd, model.head_state())
    metrics = {"head": head, "partition": int(context.node_config.get("partition-id", -1)),
               "train_loss": sum(losses) / len(losses), "steps": steps, "num-examples": steps * src.per_head_batch}
    return Message(RecordDict({P.HEAD: ArrayRecord(P.wire(reply)), P.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _inject_fault(spec: Spec, head: int, rnd: int, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """run.fault=KIND:HEAD:ROUND (a testing aid): misbehave as a broken or vanished worker."""
    if not spec.run.fault:
        return reply
    kind, h, r = spec.run.fault.split(":")
    if (int(h), int(r)) != (head, rnd):
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


class _HeadStore:
    """A head's state (A, B, V, replicas) and AdamW state between rounds, tagged with the
    round that produced it: in context.state, and on disk (node_config 'state-dir', else
    '<run.out>/client-state') so a restarted node or a resumed run continues exactly.
    The last two rounds are kept on disk: a server that resumes from its checkpoint of round k
    asks for round k's state even if round k+1 had already trained."""

    def __init__(self, context: Context, spec: Spec, head: int):
        self.context, self.head = context, head
        state_dir = context.node_config.get("state-dir") or (Path(spec.run.out) / "client-state" if spec.run.out else None)
        self.dir = Path(str(state_dir)) if state_dir else None

    def _file(self, rnd: int) -> Path:
        return self.dir / f"head-{self.head}-r{rnd}.pt"

    def save(self, model: HeadLTE, opt: torch.optim.Optimizer, rnd: int) -> None:
        head = P.wire(model.head_state(with_corr=True))
        optim = _flatten_optimizer(opt)
        self.context.state[f"head-{self.head}"] = ArrayRecord(head)
        self.context.state[f"opt-{self.head}"] = ArrayRecord(optim)
        self.context.state[f"meta-{self.head}"] = ConfigRecord({"round": rnd})
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._file(rnd).with_suffix(".tmp")
            torch.save({"head": head, "opt": optim}, tmp)
            tmp.replace(self._file(rnd))
            self._file(rnd - 2).unlink(missing_ok=True)

    def load(self, model: HeadLTE, opt: torch.optim.Optimizer, rnd: int) -> bool:
        """Load the state the head had at the end of round `rnd`; False if there is none."""
        meta = self.context.state.get(f"meta-{self.head}")
        if meta is not None and int(meta["round"]) == rnd:
            head = self.context.state[f"head-{self.head}"].to_torch_state_dict()
            optim = self.context.state[f"opt-{self.head}"].to_torch_state_dict()
        elif self.dir is not None and self._file(rnd).exists():
            saved = torch.load(self._file(rnd), map_location="cpu")
            head, optim = saved["head"], saved["opt"]
            log.info("head %d: state of round %d loaded from %s", self.head, rnd, self._file(rnd))
        else:
            return False
        model.load_head_state(head)
        _load_optimizer(opt, optim)
        return True


def _flatten_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat tensors: '<param index>.<key>' (step, exp_avg, exp_avg_sq)."""
    sd = opt.state_dict()["state"]
    return {f"{i}.{k}": torch.as_tensor(v).clone() for i, s in sd.items() for k, v in s.items()}


def _load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    if not flat:
        return
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, t in flat.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = t
    sd["state"] = state
    opt.load_state_dict(sd)


# ------------------------------------------------------------------------------- FedAvg
def _train_fedavg(msg: Message, context: Context, spec_json: str, spec: Spec) -> Message:
    """Full-model baseline: T local AdamW steps of the whole plain model on this node's shard."""
    config = msg.content[P.CONFIG]
    pid = int(_need(context.node_config, "partition-id", "node config"))
    rnd = int(_need(config, "server-round", "train config"))
    _, job, src = _job(spec_json)
    model = _plain_model(spec_json)
    model.load_state_dict(_need(msg.content, "arrays", "train message").to_torch_state_dict())
    opt = make_optimizer(list(model.parameters()), spec.lr, spec.train.weight_decay)
    if "fedavg-opt" in context.state:
        _load_optimizer(opt, context.state["fedavg-opt"].to_torch_state_dict())
    start = (rnd - 1) * spec.merge_every
    steps = min(spec.merge_every, spec.train.steps - start)
    lr = lambda step: lr_at(step, spec.lr, spec.train.warmup, spec.train.steps)  # noqa: E731
    losses = train_head(model, opt, src, pid, start, steps, lr=lr, clip=spec.train.clip, device=job.device,
                        precision=spec.run.precision)
    context.state["fedavg-opt"] = ArrayRecord(_flatten_optimizer(opt))
    metrics = {"train_loss": sum(losses) / len(losses), "num-examples": steps * src.per_head_batch}
    return Message(RecordDict({"arrays": ArrayRecord(P.wire(model.state_dict())), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@lru_cache(maxsize=2)
def _plain_model(spec_json: str):
    import copy

    _, job, _ = _job(spec_json)
    return copy.deepcopy(job.plain).to(job.device)
