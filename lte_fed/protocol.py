"""What the LTE server and its workers agree on: the message layout and reply validation.

Pure Python/PyTorch: the Flower side wraps these dicts in ArrayRecord / ConfigRecord /
MetricRecord. Names are those of the prepared plain model (lte.py).

Server -> node, one TRAIN message per node per round, carrying all the heads it trains:
    "base"      ArrayRecord  "<linear>.base.<part>": q(W), the packed quantized base
    "replicas"  ArrayRecord  "<replica>": the merged replica tensors
    "restore"   ArrayRecord  (only for heads the node must take over) "<head>.<name>": each such
                             head's state as of its last merge: lora_A, lora_B, corr_A, corr_B,
                             replicas
    "config"    ConfigRecord "heads" (list of head ids), "sources" and "committed" (one per
                             head: where its state comes from; its previous contribution was
                             merged, so apply V <- B A or B <- 0 first), "start_step", "steps",
                             "round", "spec" (the run spec as JSON)
Node -> server, one record pair per head (a bad head is refused alone):
    "head.<h>"     ArrayRecord  "<linear>.lora_A", "<linear>.lora_B", "<replica>" at the head's own
                                rank (comm.up=fp32), or the round's change packed as "delta"
                                (fp16) or "q" + "scale" (int8), decoded against the server's copy
                                of the head (lte_fed/uplink.py)
    "metrics.<h>"  MetricRecord "head", "partition", "train_loss", "steps", "num-examples", and
                                the node's per-message costs (lte_fed/costs.py)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

BASE, REPLICAS, RESTORE, CONFIG, HEAD, METRICS, WEIGHTS = "base", "replicas", "restore", "config", "head", "metrics", "arrays"


def head_record(head: int) -> str:
    """The reply's ArrayRecord holding `head`."""
    return f"{HEAD}.{head}"


def metrics_record(head: int) -> str:
    """The reply's MetricRecord of `head`."""
    return f"{METRICS}.{head}"


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


@dataclass(frozen=True)
class Verdict:
    """What the gate made of a reply: the checked head state, or why it was refused."""

    state: dict[str, torch.Tensor] | None
    train_loss: float = math.nan
    reason: str | None = None


def screen_reply(content, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], head: int,
                 error: str | None = None, arrays: str = HEAD, metrics: str = METRICS) -> Verdict:
    """The one gate every worker reply goes through before anything is merged.

    `content` is whatever the reply carried (a Flower RecordDict, or anything else a broken or
    hostile worker could send); `error` is the reply's error reason, if it was an error reply.
    Returns the tensors of record `arrays` (exactly `layout`'s names, shapes, dtypes, all
    finite) with the training loss of record `metrics`, or the reason it was refused. Nothing
    raised inside escapes.
    """
    try:
        if error is not None:
            raise ReplyError(f"the worker failed: {str(error)[:300]}")
        state, loss = _decode(content, head, arrays, metrics)
        validate_head_reply(state, layout)
        return Verdict(state, loss)
    except ReplyError as e:
        return Verdict(None, reason=str(e))
    except Exception as e:  # noqa: BLE001 -- by design: no reply can crash the server
        return Verdict(None, reason=f"unreadable reply ({type(e).__name__}: {str(e)[:200]})")


def _decode(content, head: int, arrays: str, metrics_key: str) -> tuple[dict[str, torch.Tensor], float]:
    if content is None or not hasattr(content, "keys"):
        raise ReplyError(f"no records in the reply (got {type(content).__name__})")
    if arrays not in content:
        raise ReplyError(f"no {arrays!r} record in the reply")
    record = content[arrays]
    if not callable(getattr(record, "to_torch_state_dict", None)):
        raise ReplyError(f"the {arrays!r} record is a {type(record).__name__}, not arrays")
    try:
        state = dict(record.to_torch_state_dict())
    except Exception as e:  # noqa: BLE001 -- truncated bytes, unknown serialization, odd dtypes
        raise ReplyError(f"the {arrays!r} arrays cannot be decoded ({type(e).__name__}: {str(e)[:200]})") from None
    if metrics_key not in content or not hasattr(content[metrics_key], "keys"):
        raise ReplyError(f"no {metrics_key!r} record in the reply")
    metrics = content[metrics_key]
    claimed, loss = metrics.get("head"), metrics.get("train_loss")
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed != head:
        raise ReplyError(f"the reply is for head {claimed!r}, not head {head}")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        raise ReplyError(f"train_loss is {loss!r}, not a finite number")
    return state, float(loss)


def spec_to_json(spec_dict: dict) -> str:
    return json.dumps(spec_dict, sort_keys=True)


def spec_from_json(text: str) -> dict:
    return json.loads(text)
