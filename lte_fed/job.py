"""The set-up every engine and both Flower sides share: validate the spec, load the data, build
the plain model, derive the LTE config and the per-head batch source.

One home for it, so the fused engine, the Flower server and the Flower client build exactly the
same job from the same spec.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import data as D
from . import text as T
from .lte import LTEConfig, plan
from .models import build_lm, build_model
from .spec import Spec, parse_fleet, validate
from .train import BatchSource, resolve_device

LORA_METHODS = ("lte", "mhlora", "lora", "lora_merge")
log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a run needs, built from the spec (shared by both engines)."""

    spec: Spec
    data: D.ImageData | T.TextData
    img_size: int  # 0 for text
    plain: nn.Module  # the plain model at init (never trained in place)
    device: torch.device
    whole_data_id: str | None = None  # a worker's job that holds one shard: the data_id of the set it was cut from

    @property
    def is_text(self) -> bool:
        return isinstance(self.data, T.TextData)

    @functools.cached_property
    def data_id(self) -> str:
        """A hash of the data as trained on (tokens and vocabulary, or images and labels): a
        checkpoint records it, so a run resumes only on the same data, wherever it now lives;
        a node checks that its copy is the server's."""
        if self.whole_data_id:
            return self.whole_data_id
        d = self.data
        parts = [d.train, d.doc_bounds, d.val] if self.is_text else [d.train_x, d.train_y, d.test_x, d.test_y]
        h = hashlib.blake2b(json.dumps(describe(self), sort_keys=True).encode(), digest_size=16)
        for t in parts:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def setup(spec: Spec, *, data: D.ImageData | T.TextData | None = None, skeleton: bool = False) -> Job:
    """Validate, load data (unless given), build the plain model.

    skeleton: build the model on the meta device — shapes only, no weights drawn or allocated
    (a worker fills it from the server's message; lte_fed/worker.py)."""
    validate(spec)
    device = resolve_device(spec.run.device)
    text = spec.data.name in D.TEXT_DATASETS
    if data is None:
        data = load_job_data(spec)
    img_size = 0 if text else spec.model.img_size or data.img_size

    def build() -> nn.Module:
        if text:
            return build_lm(spec.model.name, vocab_size=data.vocab_size, block_size=spec.model.block_size,
                            seed=spec.run.seed)
        return build_model(spec.model.name, num_classes=data.num_classes, img_size=img_size,
                           in_chans=data.in_chans, patch_size=spec.model.patch_size, seed=spec.run.seed)

    if not skeleton:  # once per run (a worker builds skeletons), on a meta twin: shapes, no memory
        with torch.device("meta"):
            twin = build()
        if text:  # before the real build: a block_size the text cannot fill must not allocate first
            data.block_size, data.val_tokens = twin.cfg.block_size, spec.data.val_tokens
            T.check_fits(data, text_shards(spec, data))
        if spec.method in LORA_METHODS:
            _warn_rank_above_dims(twin, spec)
        if not text and splits_data(spec):
            _warn_small_shards(data, spec)
    with torch.device("meta") if skeleton else contextlib.nullcontext():
        plain = build()
    if text:
        data.block_size, data.val_tokens = plain.cfg.block_size, spec.data.val_tokens
    return Job(spec, data, img_size, plain, device)


def _warn_rank_above_dims(model: nn.Module, spec: Spec) -> None:
    """Warn where lte.rank (or a run.fleet rank) exceeds a LoRA layer's min(m, n): B A cannot have
    rank above min(m, n), so the extra rank costs memory, compute and bytes and buys nothing. Not an
    error: one small layer (a patch embedding of 4 pixels) should not forbid a rank that suits the rest."""
    p = plan(model, spec.lte.keep_norm_affine)  # the layers LTE wraps, on a meta twin (prepare edits it)
    rank = max([spec.lte.rank] + [int(e.get("rank", 0)) for e in parse_fleet(spec.run.fleet or "rank=1")])
    small = [(name, min(model.get_submodule(name).weight.shape)) for name in p.lora]
    small = [(name, d) for name, d in small if d < rank]
    if small:
        names = ", ".join(f"{name} ({d})" for name, d in small[:4]) + (f" and {len(small) - 4} more" if len(small) > 4 else "")
        log.warning("rank %d is above min(out, in) of %d of %d LoRA layers: %s; B·A cannot have a rank above "
                    "that, so their extra rank is trained, stored and sent for nothing", rank, len(small), len(p.lora), names)


def _warn_small_shards(data: D.ImageData, spec: Spec) -> None:
    """Warn where a head's shard holds fewer samples than its batch (a Dirichlet split with a
    small data.alpha can leave a head one image): that head trains on repeats of them, and its
    update still weighs 1/N in the merge."""
    per_head = spec.train.batch_size // spec.lte.heads
    sizes = [len(s) for s in D.partition(data.train_y, spec.lte.heads, spec.data.partition, spec.data.alpha, spec.run.seed)]
    small = [(n, k) for n, k in enumerate(sizes) if k < per_head]
    if small:
        log.warning("%d of %d heads hold fewer samples than their batch of %d (data.partition=%s, data.alpha=%g): "
                    "%s; each of their batches repeats samples", len(small), len(sizes), per_head, spec.data.partition,
                    spec.data.alpha, ", ".join(f"head {n}: {k}" for n, k in small[:6]))


def load_job_data(spec: Spec) -> D.ImageData | T.TextData:
    """The whole dataset the spec names (every head's shard, and the test split)."""
    if spec.data.name in D.TEXT_DATASETS:
        return T.load_text(spec.data.name, root=spec.data.root, tokenizer=spec.data.tokenizer,
                           val_fraction=spec.data.test_fraction)
    return D.load_data(spec.data.name, root=spec.data.root, seed=spec.run.seed, img_size=spec.model.img_size,
                       test_fraction=spec.data.test_fraction, synthetic_size=spec.data.synthetic_size,
                       download=spec.data.download)


def progress(job: Job, step: int, skipped: int = 0) -> dict[str, int]:
    """How far a run is after `step` steps, for its metrics rows: samples (and, for language
    models, tokens) seen by all heads together; `skipped` samples were never trained (the steps
    a node paced under a deadline was not sent, run.deadline_steps=fit, and the rounds of a head
    that waited for room on a node)."""
    row = {"step": step, "samples": step * job.spec.train.batch_size - skipped}
    if job.is_text:
        row["tokens"] = row["samples"] * job.data.block_size
    return row


def describe(job: Job) -> dict:
    """What the data and model resolved to, for summary.json."""
    if job.is_text:
        return job.data.describe()
    return {"img_size": job.img_size, "num_classes": job.data.num_classes, "in_chans": job.data.in_chans}


def lte_config(spec: Spec) -> LTEConfig:
    variant = "reset" if spec.method == "lora_merge" else spec.lte.variant
    return LTEConfig(heads=spec.heads, rank=spec.lte.rank, alpha=float(spec.lte.alpha), variant=variant,
                     init=spec.lte.init, quant=spec.quant.base, keep_norm_affine=spec.lte.keep_norm_affine,
                     seed=spec.run.seed, rank_scale=spec.lte.rank_scale)


def splits_data(spec: Spec) -> bool:
    """Whether heads split the cumulative batch and the data (LTE and FedAvg workers), or every
    head draws the whole batch from all the data (the other methods, and lte.same_batch)."""
    return spec.method in ("lte", "fedavg") and not spec.lte.same_batch


def text_shards(spec: Spec, data: T.TextData) -> list[torch.Tensor]:
    """Each head's training tokens (`splits_data`), or all of them for a head drawing from all."""
    if splits_data(spec):
        return T.shards(data, spec.lte.heads, spec.data.partition, spec.run.seed)
    return [data.train]


def batch_source(job: Job) -> BatchSource | T.TextBatchSource:
    """Shards and per-head batch size for the method (`splits_data`)."""
    s = job.spec
    split = splits_data(s)
    if job.is_text:
        shards = text_shards(s, job.data)
        per_head = s.train.batch_size // s.lte.heads if split else s.train.batch_size
        return T.TextBatchSource(job.data, shards, per_head, job.data.block_size, s.run.seed, same_batch=not split)
    if split:
        shards = D.partition(job.data.train_y, s.lte.heads, s.data.partition, s.data.alpha, s.run.seed)
        per_head = s.train.batch_size // s.lte.heads
    else:
        shards = [torch.arange(len(job.data.train_y))]
        per_head = s.train.batch_size
    return BatchSource(job.data, shards, per_head, job.img_size, s.data.augment, s.run.seed, same_batch=not split)


