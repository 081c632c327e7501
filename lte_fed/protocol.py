"""What the LTE server and its workers agree on: the message layout and reply validation.

Pure Python/PyTorch: the Flower side wraps these dicts in ArrayRecord / ConfigRecord /
MetricRecord. Names are those of the prepared plain model (lte.py).

Server -> worker, one TRAIN message per head per round:
    "base"      ArrayRecord  "<linear>.base.<part>": q(W), the packed quantized base
    "replicas"  ArrayRecord  "<replica>": the merged replica tensors
    "restore"   ArrayRecord  (only when the worker must take the head over) the head's state
                             as of its last merge: lora_A, lora_B, corr_A, corr_B, replicas
    "config"    ConfigRecord "head", "start_step", "steps", "committed" (the head's previous
                             contribution was merged: apply V <- B A or B <- 0 first),
                             "round", "spec" (the run spec as JSON)
Worker -> server:
    "head"      ArrayRecord  "<linear>.lora_A", "<linear>.lora_B", "<replica>"
    "metrics"   MetricRecord "head", "partition", "train_loss", "steps", "num-examples"
"""

from __future__ import annotations

import json

import torch

BASE, REPLICAS, RESTORE, CONFIG, HEAD, METRICS, WEIGHTS = "base", "replicas", "restore", "config", "head", "metrics", "weights"


def wire(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors ready for an ArrayRecord: detached, on CPU, contiguous; bfloat16 (which Flower's
    arrays cannot carry) as float32."""
    out = {}
    for k, t in state.items():
        t = t.detach().cpu()
        out[k] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous()
    return out


class ReplyError(ValueError):
    """A worker's reply that must not be merged; the message says why."""


def expected_head_layout(head_state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes a head reply must have (from any head's state)."""
    return {k: (tuple(t.shape), t.dtype) for k, t in head_state.items() if ".corr_" not in k}


def validate_head_reply(got: dict[str, torch.Tensor], layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise ReplyError unless `got` has exactly the layout's names, shapes, dtypes, and only
    finite values."""
    missing = sorted(set(layout) - set(got))
    extra = sorted(set(got) - set(layout))
    if missing:
        raise ReplyError(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra:
        raise ReplyError(f"unexpected tensor(s), e.g. {extra[0]!r}")
    for k, (shape, dtype) in layout.items():
        t = got[k]
        if tuple(t.shape) != shape:
            raise ReplyError(f"{k!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != dtype:
            raise ReplyError(f"{k!r} has dtype {t.dtype}, expected {dtype}")
        if not torch.isfinite(t).all():
            raise ReplyError(f"{k!r} has non-finite values")


def spec_to_json(spec_dict: dict) -> str:
    return json.dumps(spec_dict, sort_keys=True)


def spec_from_json(text: str) -> dict:
    return json.loads(text)
