"""What the LTE server and its workers agree on: the message layout and reply validation.

Pure Python/PyTorch: the Flower side wraps these dicts in ArrayRecord / ConfigRecord /
MetricRecord. Names are those of the prepared plain model (lte.py).

Server -> node, one TRAIN message per node per round, carrying all the heads it trains:
    "base"      ArrayRecord  "<linear>.base.<part>": q(W), the packed quantized base
    "replicas"  ArrayRecord  "<replica>": the merged replica tensors
    "restore"   ArrayRecord  (only for heads the node must take over) "<head>.<name>": each such
                             head's state as of its last merge: lora_A, lora_B, corr_A, corr_B,
                             replicas
                (these three packed by `pack_wire`: one array per dtype and the layout, which
                the worker reads back with `unpack_wire`)
    "config"    ConfigRecord "heads" (list of head ids), "sources" and "committed" (one per
                             head: where its state comes from; its previous contribution was
                             merged, so apply V <- B A or B <- 0 first), "start_step", "steps",
                             "round", "spec" (the run spec as JSON)
Node -> server, one record pair per head (a bad head is refused alone):
    "head.<h>"     ArrayRecord  the head's "<linear>.lora_A", "<linear>.lora_B", "<replica>" at its
                                own rank, flattened and packed in name order as "values"
                                (comm.up=fp32), or the round's change packed as "delta" (fp16) or
                                "q" + "scale" (int8), decoded against the server's copy of the
                                head; the server unpacks with the layout it knows (uplink.py)
    "metrics.<h>"  MetricRecord "head", "partition", "train_loss", "steps", "num-examples", what
                                the node declares now ("node_heads", "node_rank",
                                "node_memory_gb": its node config, `declared`) and the node's
                                per-message costs (lte_fed/costs.py)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

BASE, REPLICAS, RESTORE, CONFIG, HEAD, METRICS, WEIGHTS = "base", "replicas", "restore", "config", "head", "metrics", "arrays"
# A head's reply metric: 1 when the node could not use the state it had saved for the head (an
# unreadable or foreign file) and trained it from the server's copy instead (why: the node's log).
STATE_LOST = "state_lost"


DECLARED = ("partition", "node_heads", "node_rank", "node_memory_gb")  # a reply's node declaration


def declared(metrics) -> tuple[int, int, int, float] | None:
    """(partition-id, heads, rank, memory-gb) a reply's metrics say its node declares, or None
    where they do not say it, or not as whole numbers >= 0 (and a finite memory)."""
    try:
        values = [metrics[k] for k in DECLARED]
    except Exception:  # noqa: BLE001 -- whatever a malformed reply holds there, it says nothing
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        return None
    if any(v != int(v) for v in values[:3]):
        return None
    return int(values[0]), int(values[1]), int(values[2]), float(values[3])


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


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """`tensors` as one flat buffer per dtype ("packed.<dtype>") and the JSON layout
    ([[name, dtype, shape, offset], ...]) that `unpack_tensors` reads them back with. Formats
    that pay per tensor (safetensors files, Flower records) then pay once per dtype: saving 8
    heads of the digits ViT takes 16 ms, not 126."""
    groups: dict[str, list[torch.Tensor]] = {}
    layout, offsets = [], {}
    for name, t in tensors.items():
        key = str(t.dtype).removeprefix("torch.")
        layout.append([name, key, list(t.shape), offsets.get(key, 0)])
        offsets[key] = offsets.get(key, 0) + t.numel()
        groups.setdefault(key, []).append(t.detach().reshape(-1))
    return {f"packed.{k}": torch.cat(ts) for k, ts in groups.items()}, json.dumps(layout)


def unpack_tensors(packed: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """`pack_tensors`' inverse: each tensor a view into its buffer. A layout that is not one
    `pack_tensors` writes, or that points outside its buffers, is a ValueError naming the entry."""
    out = {}
    entries = json.loads(layout)
    if not isinstance(entries, list):
        raise ValueError("the layout is not a list")
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and isinstance(entry[2], list)
                and all(type(d) is int and d >= 0 for d in entry[2]) and type(entry[3]) is int):
            raise ValueError(f"a layout entry is not [name, dtype, shape, offset]: {str(entry)[:100]}")
        name, key, shape, offset = entry
        buf = packed.get(f"packed.{key}")
        if buf is None:
            raise ValueError(f"{name!r}: no {key!r} buffer")
        n = math.prod(shape)
        if offset < 0 or offset + n > buf.numel():
            raise ValueError(f"{name!r} lies outside its buffer")
        out[name] = buf.reshape(-1)[offset:offset + n].view(shape)
    return out


PACKED_LAYOUT = "layout"  # a packed record's array holding its layout (JSON, as uint8)


def pack_wire(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` made ready for an ArrayRecord (`wire`) and packed: one array per dtype
    ("packed.<dtype>") plus its layout ("layout", JSON as uint8). Flower frames, hashes and
    sends every array as its own objects (in 1.41 one request each between the ServerApp and
    the SuperLink), so a record of dozens of small tensors costs more than its bytes."""
    packed, layout = pack_tensors(wire(state))
    return packed | {PACKED_LAYOUT: torch.frombuffer(bytearray(layout.encode()), dtype=torch.uint8)}


def unpack_wire(record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_wire`'s inverse (each tensor a view into its buffer); a record that does not hold
    what its layout says is a ValueError that says so."""
    if PACKED_LAYOUT not in record:
        raise ValueError(f"a packed record without its {PACKED_LAYOUT!r} array (got {sorted(record)[:3]})")
    try:
        layout = bytes(record[PACKED_LAYOUT].to(torch.uint8).numpy()).decode()
        return unpack_tensors({k: t for k, t in record.items() if k != PACKED_LAYOUT}, layout)
    except (ValueError, TypeError) as e:  # a bad layout, JSON or UTF-8 (both ValueErrors)
        raise ValueError(f"a packed record that does not match its layout ({type(e).__name__}: {str(e)[:200]})") from None


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
