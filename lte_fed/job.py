"""The set-up every engine and both Flower sides share: validate the spec, load the data, build
the plain model, derive the LTE config and the per-head batch source.

One home for it, so the fused engine, the Flower server and the Flower client build exactly the
same job from the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import data as D
from .lte import LTEConfig
from .models import build_model
from .spec import Spec, validate
from .train import BatchSource, resolve_device

LORA_METHODS = ("lte", "mhlora", "lora", "lora_merge")


@dataclass
class Job:
    """Everything a run needs, built from the spec (shared by both engines)."""

    spec: Spec
    data: D.ImageData
    img_size: int
    plain: nn.Module  # the plain model at init (never trained in place)
    device: torch.device


def setup(spec: Spec) -> Job:
    """Validate, load data, build the plain model."""
    validate(spec)
    device = resolve_device(spec.run.device)
    data = D.load_data(spec.data.name, root=spec.data.root, seed=spec.run.seed, img_size=spec.model.img_size,
                       test_fraction=spec.data.test_fraction, synthetic_size=spec.data.synthetic_size,
                       download=spec.data.download)
    img_size = spec.model.img_size or data.img_size
    plain = build_model(spec.model.name, num_classes=data.num_classes, img_size=img_size, in_chans=data.in_chans,
                        patch_size=spec.model.patch_size, seed=spec.run.seed)
    return Job(spec, data, img_size, plain, device)


def lte_config(spec: Spec) -> LTEConfig:
    variant = "reset" if spec.method == "lora_merge" else spec.lte.variant
    return LTEConfig(heads=spec.heads, rank=spec.lte.rank, alpha=float(spec.lte.alpha), variant=variant,
                     init=spec.lte.init, quant=spec.quant.base, keep_norm_affine=spec.lte.keep_norm_affine,
                     seed=spec.run.seed)


def batch_source(job: Job) -> BatchSource:
    """Shards and per-head batch size for the method: LTE heads split the cumulative batch and
    the data; every other method (and lte.same_batch) draws the whole batch from all the data."""
    s = job.spec
    split = s.method in ("lte", "fedavg") and not s.lte.same_batch
    if split:
        shards = D.partition(job.data.train_y, s.lte.heads, s.data.partition, s.data.alpha, s.run.seed)
        per_head = s.train.batch_size // s.lte.heads
    else:
        shards = [torch.arange(len(job.data.train_y))]
        per_head = s.train.batch_size
    return BatchSource(job.data, shards, per_head, job.img_size, s.data.augment, s.run.seed, same_batch=not split)


