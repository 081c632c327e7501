"""What a federated worker builds for one message: its shard of the data and its model, from
the spec and what the server sent, without ever holding W in full precision.

    job, source = node_data(spec, heads=[3], cache=state_root)   # the shard, cached on disk
    model = head_model(job, head=3)                                  # skeleton -> one head, q(W) empty
    fill_head(model, base=msg_base, replicas=msg_replicas)          # the server's q(W) and replicas

The model starts as a skeleton on the meta device (`job.setup(skeleton=True)`: shapes, no
weights drawn or allocated); the LTE surgery turns its Linears into LoRA layers whose base is
q(W)'s packed buffers, A is drawn from (seed, head) on the CPU exactly as when a full model is
parameterized, and everything else is loaded from the message. The FedAvg worker's skeleton
takes the received weights as they are (`plain_model`): no random model is built first.

A Flower node runs each message in a fresh process (FLOWER_NOTES.md), so the prepared shard is
kept on disk in the node's state dir, keyed by everything it depends on; `FullWeightWatch`
records whether a full-precision m×n weight was ever created while the model was built.
Nothing here knows Flower: clients/client_app.py wraps it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import data as D
from .job import Job, batch_source, lte_config, setup, splits_data
from .lte import HeadLTE, StackedLTE
from .spec import Spec
from .train import BatchSource

log = logging.getLogger("lte_fed.worker")
SHARDS = "shards"  # under a node's state dir


# ------------------------------------------------------------------------------- the data
def shard_key(spec: Spec, head: int) -> dict:
    """Everything head `head`'s prepared shard depends on (and nothing else): the data config,
    the seed, how many shards the data is cut into, and which one."""
    split = splits_data(spec)
    return {"data": spec.to_dict()["data"], "img_size": spec.model.img_size, "seed": spec.run.seed,
            "shards": spec.lte.heads if split else 1, "shard": head if split else 0, "v": 1}


def node_data(spec: Spec, head: int, cache: str | Path | None) -> tuple[Job, BatchSource]:
    """The job (its model a meta-device skeleton) and the batch source of a worker that trains
    `head`. Image data: the head's shard only, read from `<cache>/shards/` when an intact copy
    is there, else prepared from the whole dataset and stored (text data is loaded whole)."""
    if spec.data.name in D.TEXT_DATASETS or cache is None:
        job = setup(spec, skeleton=True)
        return job, batch_source(job)
    key = shard_key(spec, head)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache) / SHARDS / f"{spec.data.name}-{digest}.safetensors"
    data, whole_id = _read_shard(path, key)
    if data is None:
        full = setup(spec, skeleton=True)
        shard = batch_source(full).shards[key["shard"]]
        data = D.ImageData(full.data.train_x[shard].contiguous(), full.data.train_y[shard].contiguous(),
                           full.data.test_x[:0], full.data.test_y[:0], full.data.num_classes, full.data.mean,
                           full.data.std, full.data.name)
        whole_id = full.data_id
        _write_shard(path, key, data, whole_id)
    job = setup(spec, data=data, skeleton=True)
    job.whole_data_id = whole_id
    # Head `head` walks its shard by position (data.head_batch_indices), so the cached rows in
    # their original order give the same batches as the whole set with the shard's indices.
    shards = [torch.zeros(0, dtype=torch.int64)] * key["shards"]
    shards[key["shard"]] = torch.arange(len(data.train_y))
    src = BatchSource(data, shards, spec.train.batch_size // key["shards"], job.img_size, spec.data.augment,
                      spec.run.seed, same_batch=not splits_data(spec))
    return job, src


def _read_shard(path: Path, key: dict) -> tuple[D.ImageData | None, str | None]:
    """The cached shard and the data_id of the set it was cut from, or (None, None) if there is
    none or it is not exactly what `key` asks for (a truncated, corrupt or foreign file is
    rebuilt, never trusted)."""
    if not path.exists():
        return None, None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                raise ValueError("the file was written for another key")
            x, y = f.get_tensor("x"), f.get_tensor("y")
        info = json.loads(meta["info"])
        if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (len(x),) or len(x) == 0:
            raise ValueError(f"bad tensors {tuple(x.shape)} {x.dtype}, {tuple(y.shape)}")
        return D.ImageData(x, y.long(), x[:0], y[:0].long(), int(info["num_classes"]), tuple(info["mean"]),
                           tuple(info["std"]), str(info["name"])), str(info["data_id"])
    except Exception as e:  # noqa: BLE001 -- any damage means: rebuild it
        log.warning("shard cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, str(e)[:200])
        return None, None


def _write_shard(path: Path, key: dict, data: D.ImageData, data_id: str) -> None:
    """Write the shard to a private temporary file, then rename it into place: concurrent
    writers (several heads of one node, several nodes on one disk) never see half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    info = {"num_classes": data.num_classes, "mean": list(data.mean), "std": list(data.std), "name": data.name,
            "data_id": data_id}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # in the try: a file in its place is a disk problem too
        save_file({"x": data.train_x, "y": data.train_y}, str(tmp),
                  metadata={"key": json.dumps(key, sort_keys=True), "info": json.dumps(info)})
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk costs the next message a rebuild, not this one its run
        log.warning("could not cache the shard at %s: %s", path, e)
        if tmp.is_file():
            tmp.unlink()


# ------------------------------------------------------------------------------ the model
def job_imports(spec: Spec) -> None:
    """Import the libraries this job's worker loads lazily (the model's: timm, torchvision), and
    nothing else: what a process needs resident before any tensor of the job exists (the
    benchmark's memory floor). Not bitsandbytes: a worker only dequantizes q(W), which
    `lte_fed.quant` does in plain torch."""
    from .memory import analyse
    from .models import is_language_model

    if not is_language_model(spec.model.name):  # the language models need no library of their own
        try:
            analyse(spec.model.name, spec.model.img_size or 224, patch_size=spec.model.patch_size)  # meta: imports only
        except ValueError:  # a size the model cannot take: the job's own build says so, with the key
            pass


def head_model(job: Job, head: int) -> HeadLTE:
    """Head `head` on `job`'s skeleton: q(W) buffers (zero until filled), A drawn from
    (seed, head) as in every engine, B and V zero, replicas zero until filled."""
    if next(job.plain.parameters()).device.type != "meta":
        raise ValueError("head_model takes a job built with setup(skeleton=True)")
    return HeadLTE(job.plain, lte_config(job.spec), head)


@torch.no_grad()
def fill_head(model: HeadLTE, base: dict[str, torch.Tensor], replicas: dict[str, torch.Tensor]) -> None:
    """Load the server's q(W) and merged replicas (each a complete set: a missing tensor is an
    error naming it, so nothing trains on the skeleton's zeros)."""
    missing = [n for n in model.plan.replicas if n not in replicas]
    missing += [f"{n}.base.{k}" for n, l in model.lora_layers().items() for k in l.base.parts()
                if f"{n}.base.{k}" not in base]
    if missing:
        raise KeyError(f"the message lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]!r}")
    model.load_base_state(base)
    model.load_head_state({n: replicas[n] for n in model.plan.replicas})


class NodeSource:
    """The batches of a node's heads: head h's from its own shard's source (`node_sources`)."""

    def __init__(self, sources: dict[int, BatchSource]):
        self.sources = sources
        self.per_head_batch = next(iter(sources.values())).per_head_batch

    def batch(self, head: int, step: int, device):
        return self.sources[head].batch(head, step, device)


def node_sources(spec: Spec, heads: list[int], cache: str | Path | None, data=node_data) -> tuple[Job, NodeSource]:
    """A node's job (a skeleton) and the batches of its heads `heads`: each head's shard as
    `node_data` gives it (`data`: that function, or a cached wrapper of it); text data, or no
    cache, is one source for every head."""
    if spec.data.name in D.TEXT_DATASETS or cache is None:
        job, src = data(spec, heads[0], cache)
        return job, NodeSource({h: src for h in heads})
    got = {h: data(spec, h, cache) for h in heads}
    return got[heads[0]][0], NodeSource({h: src for h, (_, src) in got.items()})


def node_model(job: Job, heads: list[int], ranks: list[int] | None = None) -> StackedLTE:
    """A node's heads `heads` (each at its rank in `ranks`) stacked on `job`'s skeleton: q(W)
    buffers zero until filled (no full-precision W: lte.StackedLTE from a skeleton), each A drawn
    from (seed, head) as in every engine, B and V zero, replicas zero until filled."""
    if next(job.plain.parameters()).device.type != "meta":
        raise ValueError("node_model takes a job built with setup(skeleton=True)")
    return StackedLTE(job.plain, lte_config(job.spec), list(heads), None if ranks is None else list(ranks))


@torch.no_grad()
def fill_node(model: StackedLTE, base: dict[str, torch.Tensor], replicas: dict[str, torch.Tensor]) -> None:
    """`fill_head` for a node's stacked heads: the server's q(W) once, its replicas in every slice."""
    missing = [n for n in model.plan.replicas if n not in replicas]
    for n, l in model.lora_layers().items():
        parts = ["weight"] if l.base is None else list(l.base.parts())
        missing += [f"{n}.base.{k}" for k in parts if f"{n}.base.{k}" not in base]
    if missing:
        raise KeyError(f"the message lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]!r}")
    model.load_base_state(base)
    model.load_replicas({n: replicas[n] for n in model.plan.replicas})


def plain_model(job: Job, state: dict[str, torch.Tensor]) -> nn.Module:
    """The FedAvg worker's full model: the skeleton takes the received weights as they are
    (fp32 copies where they are not), on the job's device."""
    model = job.plain
    if next(model.parameters()).device.type != "meta":
        raise ValueError("plain_model takes a job built with setup(skeleton=True)")
    model.load_state_dict({k: t.float() for k, t in state.items()}, strict=True, assign=True)
    return model.to(job.device)


def lora_shapes(model: "HeadLTE | StackedLTE") -> set[tuple[int, int]]:
    """(m, n) of every LoRA'd Linear: the shapes of W a worker must never hold in full precision."""
    return {(l.out_features, l.in_features) for l in model.lora_layers().values()}


def lora_shapes_of(job: Job) -> set[tuple[int, int]]:
    """The same from the skeleton (before any head exists)."""
    from .lte import plan

    import copy

    net = copy.deepcopy(job.plain)  # meta: free
    p = plan(net, job.spec.lte.keep_norm_affine)
    return {tuple(net.get_submodule(n).weight.shape) for n in p.lora}


def watched(shapes: set[tuple[int, int]], ranks: list[int]) -> set[tuple[int, int]]:
    """The W shapes a `FullWeightWatch` can tell apart: those that no LoRA factor of these ranks
    shares (A (r, n), B (m, r), A's draw (max(r, n), min(r, n))). With digits' 1-channel 2x2
    patches the patch embedding's W is (64, 4), a rank-4 B of any 64-wide layer is too: a watch
    on that shape counted every B as a W."""
    factors = {f for r in ranks for m, n in shapes for f in ((r, n), (m, r), (max(r, n), min(r, n)))}
    return shapes - factors


class FullWeightWatch(TorchDispatchMode):
    """Counts the floating-point tensors, off the meta device, that any torch op creates with
    the shape of a full W (m, n) from `shapes` while it is active: the proof that building a
    worker's model allocated no full-precision copy of W. (Transient dequantized tiles while
    training are allowed and happen outside the watch.)"""

    def __init__(self, shapes: set[tuple[int, int]]):
        super().__init__()
        self.shapes, self.count, self.seen = shapes, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point() and t.ndim == 2
                    and tuple(t.shape) in self.shapes):
                self.count += 1
                if len(self.seen) < 5:
                    self.seen.append(f"{func}: {tuple(t.shape)} {t.dtype}")
        return out
