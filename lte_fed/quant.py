"""The frozen base weight a worker holds: full precision, or quantized with bitsandbytes.

LTE never trains W directly, so a worker may hold q(W) (NF4 by default) and only the server
keeps W in full precision. `QuantizedWeight` is that worker-side copy: it stores the packed
tensors bitsandbytes produces, dequantizes on the fly in the forward pass, and never keeps the
full-precision matrix alive for the backward pass (the input gradient re-dequantizes, as
QLoRA does).

The packed tensors are plain uint8/int8/float32 tensors, so they travel as they are.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

QUANT_FORMATS = ("nf4", "fp4", "int8", "none")
BLOCKSIZE_4BIT = 64

# bitsandbytes logs a warning about an optional CPU kernel package at import; it is harmless.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _bnb():
    import bitsandbytes.functional as bnbf

    return bnbf


def check_format(fmt: str) -> str:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quant.base={fmt!r} is not one of {', '.join(QUANT_FORMATS)}")
    return fmt


def quantize(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Quantize a weight (m, n) into the packed tensors of `fmt`.

    Returns a dict of tensors: nf4/fp4 -> {"packed": uint8 (m*n/2, 1), "absmax": f32 (m*n/64,)};
    int8 -> {"packed": int8 (m, n), "absmax": f32 (m,)}; none -> {"weight": f32 (m, n)}.
    """
    check_format(fmt)
    w = weight.detach().float().contiguous()
    if fmt == "none":
        return {"weight": w.clone()}
    if fmt == "int8":
        packed, row_absmax, _ = _bnb().int8_vectorwise_quant(w)
        return {"packed": packed, "absmax": row_absmax.float()}
    packed, state = _bnb().quantize_4bit(w, quant_type=fmt, blocksize=BLOCKSIZE_4BIT)
    return {"packed": packed, "absmax": state.absmax.float()}


def part_layout(shape: tuple[int, int], fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, shapes and dtypes `quantize` gives a (m, n) weight in format `fmt`, without
    quantizing anything (a worker allocates q(W)'s buffers from this, never an m×n float)."""
    check_format(fmt)
    m, n = int(shape[0]), int(shape[1])
    if fmt == "none":
        return {"weight": ((m, n), torch.float32)}
    if fmt == "int8":
        return {"packed": ((m, n), torch.int8), "absmax": ((m,), torch.float32)}
    return {"packed": (((m * n + 1) // 2, 1), torch.uint8), "absmax": ((-(-m * n // BLOCKSIZE_4BIT),), torch.float32)}


def dequantize(parts: dict[str, torch.Tensor], fmt: str, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `quantize`: the float32 weight (m, n) the packed tensors stand for."""
    if fmt == "none":
        return parts["weight"]
    if fmt == "int8":
        return _bnb().int8_vectorwise_dequant(parts["packed"], parts["absmax"]).float()
    bnbf = _bnb()
    state = bnbf.QuantState(
        absmax=parts["absmax"],
        shape=torch.Size(shape),
        code=bnbf.get_4bit_type(fmt, device=parts["packed"].device),
        blocksize=BLOCKSIZE_4BIT,
        quant_type=fmt,
        dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(parts["packed"], state).float()


def error_bound(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise bound on |dequantize(quantize(W)) - W| for each format, shape (m, n).

    4-bit formats round each entry to the nearest of 16 codes scaled by its block's absmax, so
    the error is at most half the widest gap between neighbouring codes times that absmax;
    int8 rounds to 1/127 of the row's absmax, so at most half of that step.
    """
    w = weight.detach().float()
    if fmt == "none":
        return torch.zeros_like(w)
    if fmt == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127.0 * 0.5 + 1e-6).expand_as(w)
    code = _bnb().get_4bit_type(fmt, device="cpu").float().sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    flat = w.flatten()
    pad = (-flat.numel()) % BLOCKSIZE_4BIT
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCKSIZE_4BIT)
    absmax = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks)
    return (absmax.flatten()[: flat.numel()] * half_gap * 1.001 + 1e-6).view_as(w)


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
