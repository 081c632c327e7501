"""The compressed uplink (`comm.up`): what a worker sends back, and the error feedback that keeps
compression from losing anything for good.

    fp32  the head's state itself (A, B, replicas; no error feedback)
    fp16  the round's change of that state, in float16
    int8  the round's change, in int8 with one float32 scale per block of BLOCK consecutive
          entries of the flattened tensor (symmetric absmax, round to nearest): 1 + 4/BLOCK
          bytes per entry, and B (m, r) with a small rank costs no more scales than A (r, n)
          (per-row scales would cost 4 bytes per r entries of B)

Error feedback (fp16, int8), per head and tensor, with e the residual kept by the worker:
    payload p = (x_end − x_start) + e;   send c = encode(p);   e ← p − decode(c)
so over k rounds Σ decode(c_t) = Σ (x_end − x_start)_t + e_0 − e_k: nothing is lost but the last
residual. The server rebuilds the head as ref + decode(c), ref being its own copy of the head
(the ledger's, as of the last merge): ref = x_start − e holds after every merge for A and B, and
for the replicas ref is the merged value the worker started from, so the unsent part of a
replica's change is carried into the next round's mean. A worker that takes a head over from the
server's copy (or draws it fresh) starts with e = 0. The residual is saved with the head state.

Wire: every tensor (fp32) or its change (fp16, int8), flattened and packed in name order into one
array ("values", fp32; "delta", fp16) or two ("q", int8; "scale", float32, one per block of each
tensor). One array per head, not one per tensor: Flower frames, hashes and (in simulation)
copies every array several times on its way, which for a small model costs more than the
training. The receiver unpacks with the layout it already knows. `wire_layout` is what the
reply gate checks.
"""

from __future__ import annotations

import math

import torch

UPLINKS = ("fp32", "fp16", "int8")
BLOCK = 128


def check_uplink(fmt: str) -> str:
    if fmt not in UPLINKS:
        raise ValueError(f"comm.up={fmt!r} is not one of {', '.join(UPLINKS)}")
    return fmt


def _order(layout) -> list[str]:
    """The order tensors are packed in: by name, so every side agrees whatever its dict order."""
    return sorted(layout)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def wire_layout(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], fmt: str
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes a reply in `fmt` must have, from the head state's layout:
    fp32 {"values": (total,) f32}; fp16 {"delta": (total,) f16}; int8 {"q": (total,) int8,
    "scale": (blocks,) f32}, every tensor (or its change) packed in name order."""
    total = sum(math.prod(shape) for shape, _ in layout.values())
    if check_uplink(fmt) == "fp32":
        return {"values": ((total,), torch.float32)}
    if fmt == "fp16":
        return {"delta": ((total,), torch.float16)}
    return {"q": ((total,), torch.int8), "scale": ((sum(_blocks(math.prod(s)) for s, _ in layout.values()),), torch.float32)}


def encode_tensor(t: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One float tensor in `fmt`, flattened: {"values": f32}, {"delta": f16} or {"q": int8
    (numel,), "scale": f32 (blocks,)} (symmetric absmax per block of BLOCK entries, round to
    nearest)."""
    flat = t.detach().float().reshape(-1)
    if fmt == "fp32":
        return {"values": flat}
    if fmt == "fp16":
        return {"delta": flat.half()}
    n = flat.numel()
    blocks = torch.cat([flat, flat.new_zeros((-n) % BLOCK)]).view(-1, BLOCK)
    scale = blocks.abs().amax(1) / 127.0
    q = torch.where(scale[:, None] > 0, blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                    torch.zeros_like(blocks))
    q = q.round().clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return {"q": q, "scale": scale}


def decode_tensor(parts: dict[str, torch.Tensor], fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `encode_tensor`: float32 of `shape`."""
    if fmt == "fp32":
        return parts["values"].float().reshape(shape)
    if fmt == "fp16":
        return parts["delta"].float().reshape(shape)
    q, scale = parts["q"], parts["scale"]
    return (q.float() * scale.repeat_interleave(BLOCK)[:q.numel()]).reshape(shape)


def _pack(parts: dict[str, dict[str, torch.Tensor]], layout) -> dict[str, torch.Tensor]:
    keys = next(iter(parts.values())).keys()
    return {k: torch.cat([parts[name][k] for name in _order(layout)]).contiguous() for k in keys}


def _unpack(wire: dict[str, torch.Tensor], fmt: str, layout) -> dict[str, dict[str, torch.Tensor]]:
    out, at, at_s = {}, 0, 0
    for name in _order(layout):
        n = math.prod(layout[name][0])
        if fmt in ("fp32", "fp16"):
            key = "values" if fmt == "fp32" else "delta"
            out[name] = {key: wire[key][at:at + n]}
        else:
            b = _blocks(n)
            out[name] = {"q": wire["q"][at:at + n], "scale": wire["scale"][at_s:at_s + b]}
            at_s += b
        at += n
    return out


def encode(payload: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """A payload {name: float tensor} as the wire dict of `fmt`."""
    check_uplink(fmt)
    layout = {k: (tuple(t.shape), t.dtype) for k, t in payload.items()}
    return _pack({k: encode_tensor(t, fmt) for k, t in payload.items()}, layout)


def decode(wire: dict[str, torch.Tensor], fmt: str, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]
           ) -> dict[str, torch.Tensor]:
    """The float32 payload a wire dict (already checked against `wire_layout`) stands for."""
    check_uplink(fmt)
    return {k: decode_tensor(parts, fmt, layout[k][0]) for k, parts in _unpack(wire, fmt, layout).items()}


def ef_step(end: dict[str, torch.Tensor], start: dict[str, torch.Tensor], resid: dict[str, torch.Tensor] | None,
            fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round of error feedback for fp16/int8: (wire dict, new residual).

    end, start: the head's state after and before the round's training (names as
    `HeadLTE.head_state()`); resid: the residual so far ({} or None: zero)."""
    resid = resid or {}
    parts, new_resid = {}, {}
    for k, x in end.items():
        p = x.detach().float() - start[k].detach().float()
        if k in resid:
            p = p + resid[k].to(p)
        parts[k] = encode_tensor(p, fmt)
        new_resid[k] = p - decode_tensor(parts[k], fmt, tuple(p.shape))
    layout = {k: (tuple(t.shape), t.dtype) for k, t in end.items()}
    return _pack(parts, layout), new_resid


def reconstruct(ref: dict[str, torch.Tensor], wire: dict[str, torch.Tensor], fmt: str,
                layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """The head state the server takes from a reply: the decoded state itself (fp32), else its copy
    of the head `ref` plus the decoded change."""
    got = decode(wire, fmt, layout)
    return got if fmt == "fp32" else {k: ref[k].float() + got[k] for k in layout}


def payload_bytes(layout: dict[str, tuple[tuple[int, ...], torch.dtype]], fmt: str) -> int:
    """Tensor bytes of one reply in `fmt` (the arrays only, without Flower's framing)."""
    return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size()
               for shape, dt in wire_layout(layout, fmt).values())


class FusedUplink:
    """The fused engine's stand-in for the wire under fp16/int8: per head, the worker's error
    feedback (`ef_step`) and the server's copy of the head (what the Flower ledger holds), so
    that a merge uses what a server would have received, exactly as on Flower.

    start[n]: head n's state when the round began; resid[n]: its residual; server[n]: the
    server's copy (A, B, V factors, replicas) as of the last merge.
    """

    def __init__(self, model, fmt: str):
        from .protocol import expected_head_layout

        self.fmt, self.heads, self.variant = check_uplink(fmt), model.n_heads, model.cfg.variant
        # each head's own layout: heads of different rank travel at their own rank
        self.layouts = [expected_head_layout(model.head_state(n)) for n in range(self.heads)]
        self.start = [_clone(model.head_state(n)) for n in range(self.heads)]
        self.resid: list[dict[str, torch.Tensor]] = [{} for _ in range(self.heads)]
        self.server = [_clone(model.head_state(n, with_corr=True)) for n in range(self.heads)]

    @torch.no_grad()
    def merge(self, model, outer=None, anchors: dict[str, torch.Tensor] | None = None) -> None:
        """`StackedLTE.merge`, with the merge computed from the rebuilt replies."""
        from .lora import commit_factors, pad_rank

        got = []
        for n in range(self.heads):
            wire, self.resid[n] = ef_step(model.head_state(n), self.start[n], self.resid[n], self.fmt)
            got.append(reconstruct(self.server[n], wire, self.fmt, self.layouts[n]))
        stack = lambda key, src: torch.stack([s[key] for s in src])  # noqa: E731
        exact = self.variant == "exact"
        for name, layer in model.lora_layers().items():
            def padded(kind, src, name=name, layer=layer):  # (B, A) stacked, zero-padded to the layer's rank
                pairs = [pad_rank(s[f"{name}.{kind}_A"], s[f"{name}.{kind}_B"], layer.rank) for s in src]
                return torch.stack([b for _, b in pairs]), torch.stack([a for a, _ in pairs])
            B, A = padded("lora", got)
            VB, VA = padded("corr", self.server) if exact else (None, None)
            factors = (B, A, VB, VA)
            step = None if outer is None else (lambda d, name=name: outer.propose(name, d))
            layer.merge(step, average_bias=False, factors=factors)
        merged = {}
        for name, p in model.replica_params().items():
            mean = stack(name, got).mean(0)
            merged[name] = mean if outer is None else outer.propose_mean(name, mean, anchors[name])
            p.copy_(merged[name].reshape(p.shape[1:]).unsqueeze(0).expand_as(p))
        if outer is not None:
            outer.commit()
            anchors.update({k: v.clone() for k, v in merged.items()})
        for n in range(self.heads):  # the server's copies follow the post-merge rule (ledger._commit)
            srv = self.server[n]
            for name in model.lora_layers():
                A, B = got[n][f"{name}.lora_A"].clone(), got[n][f"{name}.lora_B"].clone()
                commit_factors(A, B, srv.get(f"{name}.corr_A"), srv.get(f"{name}.corr_B"), self.variant)
                srv[f"{name}.lora_A"], srv[f"{name}.lora_B"] = A, B
            srv.update({k: v.clone() for k, v in merged.items()})
        self.start = [_clone(model.head_state(n)) for n in range(self.heads)]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in range(self.heads):
            for part, d in (("start", self.start[n]), ("resid", self.resid[n]), ("server", self.server[n])):
                out.update({f"{n}.{part}.{k}": t for k, t in d.items()})
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for n in range(self.heads):
            for part in ("start", "resid", "server"):
                head = f"{n}.{part}."
                getattr(self, part)[n] = {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}


def _clone(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().float().clone() for k, t in d.items()}
