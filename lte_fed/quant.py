"""The frozen base weight a worker holds: full precision, or quantized with bitsandbytes.

LTE never trains W directly, so a worker may hold q(W) (NF4 by default) and only the server
keeps W in full precision. `QuantizedWeight` is that worker-side copy: it stores the packed
tensors bitsandbytes produces, dequantizes on the fly in the forward pass, and never keeps the
full-precision matrix alive for the backward pass (the input gradient re-dequantizes, as
QLoRA does).

The packed tensors are plain uint8/int8/float32 tensors, so they travel as they are.
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
    packed, state = _bnb().quantize_4bit(w, quant_type=kind, blocksize=BLOCKSIZE_4BIT, compress_statistics=double)
    if not double:
        return {"packed": packed, "absmax": state.absmax.float()}
    if state.state2.blocksize != BLOCKSIZE_ABSMAX:
        raise RuntimeError(f"bitsandbytes double-quantized the absmax in blocks of {state.state2.blocksize}, "
                           f"not {BLOCKSIZE_ABSMAX}: this bitsandbytes version is not supported")
    return {"packed": packed, "absmax": state.absmax, "absmax2": state.state2.absmax.float(),
            "offset": state.offset.float().reshape(1)}


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
    if fmt == "int8":
        return _bnb().int8_vectorwise_dequant(parts["packed"], parts["absmax"]).float()
    bnbf = _bnb()
    kind, double = four_bit(fmt)
    state = bnbf.QuantState(
        absmax=dequantize_absmax(parts) if double else parts["absmax"],
        shape=torch.Size(shape),
        code=bnbf.get_4bit_type(kind, device=parts["packed"].device),
        blocksize=BLOCKSIZE_4BIT,
        quant_type=kind,
        dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(parts["packed"], state).float()


def dequantize_absmax(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A double-quantized 4-bit weight's per-block absmax as float32 (b,)."""
    state2 = _bnb().QuantState(absmax=parts["absmax2"], code=_absmax_code(parts["absmax"].device),
                               blocksize=BLOCKSIZE_ABSMAX, dtype=torch.float32)
    return _bnb().dequantize_blockwise(parts["absmax"], state2) + parts["offset"]


@functools.lru_cache(maxsize=None)
def _absmax_code(device: torch.device) -> torch.Tensor:
    """The 256-entry signed dynamic map bitsandbytes quantizes the absmax with (fixed, so it
    is rebuilt here rather than sent)."""
    return _bnb().create_dynamic_map(signed=True).to(device)


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
    code = _bnb().get_4bit_type(kind, device="cpu").float().sort().values
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
