"""The frozen base weight a worker holds: full precision, or quantized with bitsandbytes.

LTE never trains W directly, so a worker may hold q(W) (NF4 by default) and only the server
keeps W in full precision. `QuantizedWeight` is that worker-side copy: it stores the packed
tensors bitsandbytes produces, dequantizes on the fly in the forward pass, and never keeps the
full-precision matrix alive for the backward pass (the input gradient re-dequantizes, as
QLoRA does).

The packed tensors are plain uint8/int8/float32 tensors, so they travel as they are.

The formats are bitsandbytes'; this module computes them in plain torch, bit for bit what
bitsandbytes returns (tests/test_quant.py checks both directions for every format). A worker only
dequantizes, and never imports bitsandbytes: that costs several seconds (it builds torch.compile
wrappers at import), paid again by every message of a deployed client, since Flower starts a
fresh process per message. The server quantizes the 4-bit codes here too, 3x faster than
bitsandbytes' CPU code (a binary search per weight, on the server's critical path every round);
it calls bitsandbytes only for int8 and for a double-quantized absmax (1/64 of the weights).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

QUANT_FORMATS = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8", "none")
BLOCKSIZE_4BIT = 64
# "-dq": QLoRA's double quantization. The per-block absmax (fp32, 4 B per 64 weights) is itself
# quantized to uint8 with bitsandbytes' dynamic map in blocks of 256, around its mean, cutting a
# 4-bit base from 0.5625 to 0.5157 B per weight on the wire and in memory. The 4-bit codes are
# the same; only the scale each block is dequantized with moves (by < 1% of the absmax).
BLOCKSIZE_ABSMAX = 256

# bitsandbytes logs a warning about an optional CPU kernel package at import; it is harmless.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _bnb():
    import bitsandbytes.functional as bnbf

    return bnbf


def four_bit(fmt: str) -> tuple[str, bool] | None:
    """(bitsandbytes quant_type, double-quantized?) for a 4-bit format, else None."""
    if fmt in ("nf4", "fp4", "nf4-dq", "fp4-dq"):
        return fmt[:3], fmt.endswith("-dq")
    return None


def check_format(fmt: str) -> str:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quant.base={fmt!r} is not one of {', '.join(QUANT_FORMATS)}")
    return fmt


def quantize(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Quantize a weight (m, n) into the packed tensors of `fmt`.

    Returns a dict of tensors (b = ceil(m*n/64) blocks): nf4/fp4 -> {"packed": uint8
    (m*n/2, 1), "absmax": f32 (b,)}; nf4-dq/fp4-dq -> {"packed", "absmax": uint8 (b,),
    "absmax2": f32 (ceil(b/256),), "offset": f32 (1,)}; int8 -> {"packed": int8 (m, n),
    "absmax": f32 (m,)}; none -> {"weight": f32 (m, n)}.
    """
    check_format(fmt)
    w = weight.detach().float().contiguous()
    if fmt == "none":
        return {"weight": w.clone()}
    if fmt == "int8":
        packed, row_absmax, _ = _bnb().int8_vectorwise_quant(w)
        return {"packed": packed, "absmax": row_absmax.float()}
    kind, double = four_bit(fmt)
    packed, absmax = quantize_4bit(w, kind)
    if not double:
        return {"packed": packed, "absmax": absmax}
    # what bitsandbytes' quantize_4bit(compress_statistics=True) does with the absmax
    offset = absmax.mean()
    codes, state2 = _bnb().quantize_blockwise(absmax - offset, blocksize=BLOCKSIZE_ABSMAX)
    return {"packed": packed, "absmax": codes, "absmax2": state2.absmax.float(), "offset": offset.float().reshape(1)}


def quantize_4bit(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise 4-bit quantization (`quantize_4bit`, blocks of 64, what its
    reference backend computes), bit for bit (tests/test_quant.py): each block scaled by its
    absmax into [-1, 1], each entry coded as the nearest of `kind`'s 16 values.

    Shapes: w (m, n) float32 -> packed (ceil(m*n/2), 1) uint8, two codes per byte, the earlier
    in the high nibble; absmax (ceil(m*n/64),) float32, the last block possibly partial.
    """
    flat = w.reshape(-1)
    numel = flat.numel()
    full = numel - numel % BLOCKSIZE_4BIT
    blocks = flat[:full].view(-1, BLOCKSIZE_4BIT)
    absmax = blocks.abs().amax(dim=1)
    # times the reciprocal for whole blocks, divided for the partial one: as bitsandbytes rounds
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if full < numel:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp_(-1, 1)])
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble codes a 0
        scaled = F.pad(scaled, (0, 1))
    bounds, order = _code_bounds(kind, w.device)
    # the nearest value's rank = how many midpoints lie strictly below (torch.bucketize's answer;
    # 15 vectorized comparisons are 2.7x faster than its binary search, measured on the CPU)
    rank = torch.zeros(scaled.shape, dtype=torch.uint8, device=w.device)
    for bound in bounds:
        rank += scaled > bound
    codes = rank if order is None else order[rank.long()]
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), absmax


@functools.lru_cache(maxsize=None)
def _code_bounds(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 15 midpoints between `kind`'s values in ascending order (each a 0-dim float32
    tensor), and the code of each rank (uint8 (16,); None for NF4, whose codes ascend)."""
    values = code_values(kind, device)
    order = torch.argsort(values)
    mids = (values[order[:-1]] + values[order[1:]]) / 2
    return tuple(mids.unbind()), None if torch.equal(order, torch.arange(16, device=device)) else order.to(torch.uint8)


def part_layout(shape: tuple[int, int], fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes `quantize` gives a (m, n) weight in format `fmt`, without
    quantizing anything (a worker allocates q(W)'s buffers from this, never an m×n float)."""
    check_format(fmt)
    m, n = int(shape[0]), int(shape[1])
    if fmt == "none":
        return {"weight": ((m, n), torch.float32)}
    if fmt == "int8":
        return {"packed": ((m, n), torch.int8), "absmax": ((m,), torch.float32)}
    blocks = -(-m * n // BLOCKSIZE_4BIT)
    packed = (((m * n + 1) // 2, 1), torch.uint8)
    if not four_bit(fmt)[1]:
        return {"packed": packed, "absmax": ((blocks,), torch.float32)}
    return {"packed": packed, "absmax": ((blocks,), torch.uint8),
            "absmax2": ((-(-blocks // BLOCKSIZE_ABSMAX),), torch.float32), "offset": ((1,), torch.float32)}


def dequantize(parts: dict[str, torch.Tensor], fmt: str, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `quantize`: the float32 weight (m, n) the packed tensors stand for."""
    if fmt == "none":
        return parts["weight"]
    if fmt == "int8":  # each row's codes times its absmax / 127, multiplied as bitsandbytes does
        return parts["packed"] * parts["absmax"].view(-1, 1) * _INV_127
    kind, double = four_bit(fmt)
    absmax = dequantize_absmax(parts) if double else parts["absmax"]
    return dequantize_4bit(parts["packed"], absmax, kind, shape)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """A 4-bit weight (m, n) from its packed codes (ceil(m*n/2), 1) uint8 — two per byte, the
    earlier entry in the high nibble — and its per-block absmax (ceil(m*n/64),) float32: each
    entry is its code's value times its block's absmax."""
    numel = shape[0] * shape[1]
    # One gather of 8-byte pairs with int32 indices (2 bytes per weight, transient); a gather per
    # nibble was 3x slower, measured.
    out = torch.index_select(_byte_pairs(kind, packed.device), 0, packed.view(-1).int()).view(torch.float32)
    full = numel - numel % BLOCKSIZE_4BIT
    out[:full].view(-1, BLOCKSIZE_4BIT).mul_(absmax[: full // BLOCKSIZE_4BIT].view(-1, 1))
    if full < numel:
        out[full:numel].mul_(absmax[-1])  # the last, partial block
    return out[:numel].view(shape)


def dequantize_absmax(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A double-quantized 4-bit weight's per-block absmax as float32 (b,): each uint8 code's
    value in the dynamic map times its group's absmax2 (groups of 256 blocks), plus the offset."""
    codes = _dynamic_map(parts["absmax"].device)[parts["absmax"].int()]
    groups = parts["absmax2"].repeat_interleave(BLOCKSIZE_ABSMAX)[: codes.numel()]
    return codes * groups + parts["offset"]


# float32(1/127): bitsandbytes dequantizes an int8 row by multiplying with it, not dividing.
_INV_127 = 7.874015718698502e-3

# The value of each 4-bit code before its block's absmax scales it, as bitsandbytes defines them.
# NF4: quantiles of a standard normal, scaled to [-1, 1] (QLoRA, arXiv:2305.14314). FP4: sign,
# 2 exponent bits, 1 mantissa bit (in units of 1/16), normalised by the largest magnitude, 12;
# code 8 is -0, as bitsandbytes' CPU and CUDA kernels decode it.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_FP4_SIXTEENTHS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_values(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(16,) float32: what each 4-bit code of `kind` ("nf4" or "fp4") stands for, in code order."""
    if kind == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    if kind == "fp4":
        values = torch.tensor(_FP4_SIXTEENTHS, dtype=torch.float32, device=device)
        return values / values.abs().max()
    raise ValueError(f"no 4-bit code {kind!r}: nf4 or fp4")


@functools.lru_cache(maxsize=None)
def _byte_pairs(kind: str, device: torch.device) -> torch.Tensor:
    """(256,) int64: the two float32 values a packed byte stands for (high nibble first), as one
    8-byte element, so unpacking a byte is a single gather."""
    code = code_values(kind, device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.int64).view(-1)


@functools.lru_cache(maxsize=None)
def _dynamic_map(device: torch.device) -> torch.Tensor:
    """(256,) float32, sorted: the signed 8-bit dynamic map a double-quantized absmax is coded in
    (bitsandbytes' `create_dynamic_map(signed=True)`, after Dettmers, arXiv:1511.04561). Decade
    10^(i-6), i = 0..6, holds the midpoints of 2^i equal steps over [0.1, 1] times 10^(i-6), with
    both signs; then 0 and 1. It is fixed, so it is rebuilt here rather than sent."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * midpoints).tolist() + (-(10 ** (i - 6)) * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def error_bound(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(W)) - W| for each format, shape (m, n).

    4-bit formats round each entry to the nearest of 16 codes scaled by its block's absmax, so
    the error is at most half the widest gap between neighbouring codes times that absmax; a
    double-quantized block is then scaled by its rounded absmax instead, which adds at most
    |rounded - true absmax| (every code is within [-1, 1]); int8 rounds to 1/127 of the row's
    absmax, so at most half of that step.
    """
    w = weight.detach().float()
    if fmt == "none":
        return torch.zeros_like(w)
    if fmt == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127.0 * 0.5 + 1e-6).expand_as(w)
    kind, double = four_bit(check_format(fmt))
    code = code_values(kind).sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    flat = w.flatten()
    pad = (-flat.numel()) % BLOCKSIZE_4BIT
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCKSIZE_4BIT)
    absmax = blocks.abs().amax(dim=1)
    bound = absmax * half_gap * 1.001
    if double:
        bound = bound + (dequantize_absmax(quantize(w, fmt)) - absmax).abs() * 1.001
    per_entry = bound[:, None].expand_as(blocks).flatten()[: flat.numel()]
    return (per_entry + 1e-6).view_as(w)


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ with W rebuilt from packed tensors; saves only the packed tensors."""

    @staticmethod
    def forward(ctx, x, qweight: "QuantizedWeight"):
        ctx.qweight = qweight
        return F.linear(x, qweight.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.qweight.dequantize().to(grad_out.dtype)
        return grad_out @ w, None


class QuantizedWeight(nn.Module):
    """A frozen (m, n) weight held in format `fmt`; `linear(x)` computes x Wᵀ.

    Its packed tensors are buffers, so they follow `.to(device)` and `state_dict`. A new one
    holds zeros in the packed layout (`part_layout`) until `set_weight` or `set_parts` fills it.
    """

    def __init__(self, shape: tuple[int, int], fmt: str = "nf4", device: torch.device | str | None = None):
        super().__init__()
        self.fmt = check_format(fmt)
        self.shape = (int(shape[0]), int(shape[1]))
        for name, (part_shape, dtype) in part_layout(self.shape, fmt).items():
            self.register_buffer(name, torch.zeros(part_shape, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: str) -> "QuantizedWeight":
        q = cls(tuple(weight.shape), fmt, device=weight.device)
        q.set_weight(weight)
        return q

    def parts(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize from a full-precision weight (the server's merged W)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {self.shape}")
        device = next(iter(self.parts().values())).device
        self.set_parts(quantize(weight.to(device), self.fmt))

    def set_parts(self, parts: dict[str, torch.Tensor]) -> None:
        """Load packed tensors as they arrived (shapes and dtypes must match)."""
        for name, buf in self.parts().items():
            if name not in parts:
                raise ValueError(f"quantized weight is missing {name!r}")
            t = parts[name]
            if tuple(t.shape) != tuple(buf.shape) or t.dtype != buf.dtype:
                raise ValueError(
                    f"quantized {name!r}: got {tuple(t.shape)} {t.dtype}, "
                    f"expected {tuple(buf.shape)} {buf.dtype}"
                )
            buf.copy_(t)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.parts(), self.fmt, self.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "none":
            return F.linear(x, self.weight.to(x.dtype))
        return _DequantLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, fmt={self.fmt}"
