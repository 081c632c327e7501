"""LoRA layers for LTE and the merge math.

One head on a linear layer with frozen base W (m, n), factors A (r, n), B (m, r), s = alpha / r:

    y = (W - s·V) x + s·B A x + b

V is the head's own contribution already merged into W (`exact` variant, V = B A as of the
last merge; paper appendix A.2) or 0 (`reset` variant). V is kept as its factors (V_B, V_A) so
a worker never holds a second m×n matrix.

Merge over the heads S that took part:   W <- W + (s/|S|) Σ_{n∈S} (B_n A_n - V_n)
and then, per head: exact -> V_n <- B_n A_n (A, B, optimizer kept); reset -> B_n <- 0.

`LoRALinear` is one head (what a federated worker trains). `StackedLoRALinear` holds N heads:
the base matmul is done once for the whole batch and head n's LoRA term is applied to the n-th
slice of the batch (what the fused engine trains).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedWeight

VARIANTS = ("exact", "reset")
INITS = ("orthogonal", "kaiming", "xavier")


# ----------------------------------------------------------------------------------- init
def init_lora_A(rank: int, fan_in: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """A fresh A (rank, fan_in) drawn from `generator`.

    orthogonal: orthonormal rows (or columns when rank > fan_in) rescaled by sqrt(fan_in/rank)
      so that ||A x|| ≈ ||x|| for isotropic x (the semi-orthogonal init of Bernstein et al.);
    kaiming: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the usual LoRA init;
    xavier: U(-b, b) with b = sqrt(6 / (fan_in + rank)).
    """
    if scheme == "orthogonal":
        g = torch.randn(max(rank, fan_in), min(rank, fan_in), generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # unique Q: the draw alone decides it
        a = q.T if rank <= fan_in else q  # (rank, fan_in)
        return (a * math.sqrt(max(fan_in / rank, 1.0))).float()
    if scheme == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
    elif scheme == "xavier":
        bound = math.sqrt(6.0 / (fan_in + rank))
    else:
        raise ValueError(f"lte.init={scheme!r} is not one of {', '.join(INITS)}")
    return (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound


# ----------------------------------------------------------------------------------- math
def lora_delta(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Σ_n B_n A_n: B (N, m, r), A (N, r, n) -> (m, n), in fp32 (fp64 if the factors are)."""
    dtype = torch.promote_types(torch.promote_types(B.dtype, A.dtype), torch.float32)
    return torch.einsum("hmr,hrn->mn", B.to(dtype), A.to(dtype))


def merge_update(
    B: torch.Tensor, A: torch.Tensor, VB: torch.Tensor | None, VA: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The merge's change to W: (s/N) Σ_n (B_n A_n - V_n), shapes B (N, m, r), A (N, r, n).

    VB, VA are the factors of V (same shapes as B, A), or None for V = 0.
    """
    delta = lora_delta(B, A)
    if VB is not None:
        delta = delta - lora_delta(VB, VA)
    return delta * (scale / B.shape[0])


@torch.no_grad()
def commit_factors(A: torch.Tensor, B: torch.Tensor, VA: torch.Tensor | None, VB: torch.Tensor | None,
                   variant: str) -> None:
    """What happens to a head once its update is in W, in place (one head or stacked heads):
    exact -> V <- B A (kept as its factors: VA <- A, VB <- B); reset -> B <- 0. A and the
    optimizer state are kept either way, and A is never redrawn."""
    if variant == "exact":
        VA.copy_(A)
        VB.copy_(B)
    else:
        B.zero_()


def _lora_term(x, A, B, VA, VB):
    """B (A x) - V_B (V_A x) for one head: x (..., n), A (r, n), B (m, r) -> (..., m)."""
    out = F.linear(F.linear(x, A), B)
    if VA is not None:
        out = out - F.linear(F.linear(x, VA), VB)
    return out


def _stacked_lora_term(xs, A, B):
    """B_n (A_n x_n) for every head at once: xs (N, L, n), A (N, r, n), B (N, m, r) -> (N, L, m)."""
    return torch.bmm(torch.bmm(xs, A.transpose(1, 2).to(xs.dtype)), B.transpose(1, 2).to(xs.dtype))


# ----------------------------------------------------------------------------------- layers
class LoRALinear(nn.Module):
    """One LTE head wrapping an `nn.Linear`: the base is frozen (optionally quantized), A, B and
    the bias (a replica) train. Shapes: base (m, n), lora_A (r, n), lora_B (m, r)."""

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        *,
        variant: str = "exact",
        init: str = "orthogonal",
        quant: str = "nf4",
        generator: torch.Generator,
    ):
        super().__init__()
        _check(rank, variant)
        m, n = linear.weight.shape
        self.in_features, self.out_features, self.rank = n, m, rank
        self.scale = alpha / rank
        self.variant = variant
        self.base = QuantizedWeight.from_weight(linear.weight.detach(), quant)
        self.lora_A = nn.Parameter(init_lora_A(rank, n, init, generator))
        self.lora_B = nn.Parameter(torch.zeros(m, rank))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone().float())
        if variant == "exact":
            self.register_buffer("corr_A", torch.zeros(rank, n))
            self.register_buffer("corr_B", torch.zeros(m, rank))
        else:
            self.corr_A = self.corr_B = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.linear(x) + self.scale * _lora_term(x, self.lora_A, self.lora_B, self.corr_A, self.corr_B)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def commit_merge(self) -> None:
        """This head's contribution is now in W (`commit_factors`)."""
        commit_factors(self.lora_A, self.lora_B, self.corr_A, self.corr_B, self.variant)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, rank={self.rank}, scale={self.scale:g}, {self.variant}"


class StackedLoRALinear(nn.Module):
    """N LTE heads on one linear layer, for the fused engine.

    Holds the full-precision W (m, n) (merges happen here) and, if quantized, q(W) used in the
    forward. lora_A (N, r, n), lora_B (N, m, r), bias (N, m), corr_* like lora_*.

    mode "split" (LTE): the batch is N equal slices, head n computes
        y_n = q(W) x_n - s V_n x_n + s B_n A_n x_n + b_n.
    mode "sum" (multi-head LoRA, paper eq. 2): every sample sees all heads,
        y = q(W) x + (s/N) Σ_n B_n A_n x + mean_n b_n.
    """

    def __init__(
        self,
        linear: nn.Linear,
        heads: int,
        rank: int,
        alpha: float,
        *,
        variant: str = "exact",
        init: str = "orthogonal",
        quant: str = "nf4",
        generators: list[torch.Generator],
    ):
        super().__init__()
        _check(rank, variant)
        if len(generators) != heads:
            raise ValueError("one generator per head is required")
        m, n = linear.weight.shape
        self.in_features, self.out_features, self.rank, self.heads = n, m, rank, heads
        self.scale = alpha / rank
        self.variant = variant
        self.quant = quant
        self.mode = "split"
        self.register_buffer("weight", linear.weight.detach().clone().float())
        self.base = None if quant == "none" else QuantizedWeight.from_weight(self.weight, quant)
        self.lora_A = nn.Parameter(torch.stack([init_lora_A(rank, n, init, g) for g in generators]))
        self.lora_B = nn.Parameter(torch.zeros(heads, m, rank))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().expand(heads, m).clone())
        if variant == "exact":
            self.register_buffer("corr_A", torch.zeros(heads, rank, n))
            self.register_buffer("corr_B", torch.zeros(heads, m, rank))
        else:
            self.corr_A = self.corr_B = None

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.base is None else self._dequantized()
        return F.linear(x, w.to(x.dtype))

    def _dequantized(self) -> torch.Tensor:
        """q(W) as float, dequantized once and reused until the packed tensors change (a merge,
        a load, a move). The fused engine holds W in full precision anyway, so one more copy
        costs what W costs, and spares the two dequantizations per layer per step that a
        memory-bound worker (`LoRALinear`, `QuantizedWeight.linear`) pays. The values are
        the same: the same dequantize of the same packed tensors."""
        key = tuple((id(t), t._version) for t in self.base.parts().values())
        if getattr(self, "_deq_key", None) != key:
            self._deq = self.base.dequantize()
            self._deq_key = key
        return self._deq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_linear(x)
        N, s = self.heads, self.scale
        if self.mode == "sum":
            A = self.lora_A.reshape(N * self.rank, -1)  # (N r, n)
            B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # (m, N r)
            y = y + (s / N) * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
            return y if self.bias is None else y + self.bias.mean(0)
        if x.shape[0] % N:
            raise ValueError(f"batch of {x.shape[0]} does not split into {N} heads")
        xs = x.reshape(N, -1, self.in_features)  # head n owns the n-th slice of the batch
        d = _stacked_lora_term(xs, self.lora_A, self.lora_B)
        if self.corr_A is not None:
            d = d - _stacked_lora_term(xs, self.corr_A, self.corr_B)
        d = s * d
        if self.bias is not None:
            d = d + self.bias[:, None, :].to(d.dtype)
        return y + d.reshape(y.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (s/N) Σ (B_n A_n - V_n); then V <- B A (exact) or B <- 0 (reset); biases
        averaged; q(W) refreshed."""
        self.weight += merge_update(self.lora_B, self.lora_A, self.corr_B, self.corr_A, self.scale).to(self.weight)
        commit_factors(self.lora_A, self.lora_B, self.corr_A, self.corr_B, self.variant)
        if self.bias is not None:
            self.bias.copy_(self.bias.mean(0, keepdim=True).expand_as(self.bias))
        if self.base is not None:
            self.base.set_weight(self.weight)

    def merged_weight(self) -> torch.Tensor:
        """What W would be after a merge now, without changing anything: (m, n)."""
        return self.weight + merge_update(self.lora_B, self.lora_A, self.corr_B, self.corr_A, self.scale).to(self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}->{self.out_features}, heads={self.heads}, rank={self.rank}, "
            f"scale={self.scale:g}, {self.variant}, base={self.quant}"
        )


def _check(rank: int, variant: str) -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lte.rank must be a positive integer, got {rank!r}")
    if variant not in VARIANTS:
        raise ValueError(f"lte.variant={variant!r} is not one of {', '.join(VARIANTS)}")
