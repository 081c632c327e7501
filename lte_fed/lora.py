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


# ---------------------------------------------------------------------------------- scale
RANK_SCALES = ("sqrt", "linear")


def head_scale(alpha: float, rank: int, ref_rank: int, rule: str = "sqrt") -> float:
    """s of a head of rank `rank` in a run whose lte.rank is `ref_rank`.

    linear: s = alpha / rank (plain LoRA).
    sqrt:   s = alpha / sqrt(rank · ref_rank): alpha / rank at the run's rank, and ∝ 1/√rank
            across ranks. With A's rows scaled so that ‖A x‖ ≈ ‖x‖ and Adam moving every entry
            of B by about the learning rate, ‖B A x‖ grows like √rank, so 1/√rank (rsLoRA's
            rule) keeps the heads' updates the same size whatever their rank; 1/rank shrinks a
            rank-16 head's update 2x against a rank-4 one's.
    Both equal alpha / rank when every head has the run's rank (uniform runs are unchanged).
    """
    if rule == "linear" or rank == ref_rank:
        return alpha / rank
    if rule == "sqrt":
        return alpha / math.sqrt(rank * ref_rank)
    raise ValueError(f"lte.rank_scale={rule!r} is not one of {', '.join(RANK_SCALES)}")


def _per_head(scale, like: torch.Tensor) -> "float | torch.Tensor":
    """A float, or per-head scales as (N, 1, 1) on `like`'s device and dtype."""
    return scale if isinstance(scale, float | int) else scale.to(like).view(-1, 1, 1)


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, n), B (m, r) zero-padded to `rank` >= r: B A is unchanged, and the padding stays
    zero under training (its gradients are products with the other factor's zero padding)."""
    r = A.shape[-2]
    return F.pad(A, (0, 0, 0, rank - r)), F.pad(B, (0, rank - r))


# ----------------------------------------------------------------------------------- math
def lora_delta(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Σ_n B_n A_n: B (N, m, r), A (N, r, n) -> (m, n), in fp32 (fp64 if the factors are)."""
    dtype = torch.promote_types(torch.promote_types(B.dtype, A.dtype), torch.float32)
    return torch.einsum("hmr,hrn->mn", B.to(dtype), A.to(dtype))


def merge_update(
    B: torch.Tensor, A: torch.Tensor, VB: torch.Tensor | None, VA: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The merge's change to W: (s/N) Σ_n (B_n A_n - V_n), shapes B (N, m, r), A (N, r, n).

    VB, VA are the factors of V (same shapes as B, A), or None for V = 0. `scale` is one float,
    or a (N,) tensor of per-head scales (heads of different rank): (1/N) Σ_n s_n (B_n A_n - V_n).
    """
    if not isinstance(scale, float | int):
        s = _per_head(scale, B)
        return merge_update(B * s, A, None if VB is None else VB * s, VA, 1.0)
    delta = lora_delta(B, A)
    if VB is not None:
        delta = delta - lora_delta(VB, VA)
    return delta * (scale / B.shape[0])


def merge_update_heads(heads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]]
                       ) -> torch.Tensor:
    """(1/|S|) Σ_n s_n (B_n A_n - V_n) over heads of any rank: `heads` lists (B (m, r_n),
    A (r_n, n), V_B, V_A or None, s_n), in a fixed order. Heads of one rank and scale are
    summed in one batch, so a run whose heads all have one rank computes exactly `merge_update`."""
    groups: dict[tuple[int, float], list[int]] = {}
    for i, (_, A, _, _, s) in enumerate(heads):
        groups.setdefault((A.shape[0], float(s)), []).append(i)
    total = None
    for (_, s), idx in groups.items():
        B = torch.stack([heads[i][0].float() for i in idx])
        A = torch.stack([heads[i][1].float() for i in idx])
        exact = heads[idx[0]][2] is not None
        VB = torch.stack([heads[i][2] for i in idx]) if exact else None
        VA = torch.stack([heads[i][3] for i in idx]) if exact else None
        part = merge_update(B, A, VB, VA, s)
        if len(groups) > 1:
            part = part * (len(idx) / len(heads))
        total = part if total is None else total + part
    return total


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


def lte_linear_plain(xs, W, A, B, bias, VA, VB, scale):
    """The LTE layer written plainly, op by op (autograd does the backward); the reference every
    fast path is tested against.

    xs (N, L, n): head n's L tokens; W (m, n) shared or (N, m, n) per head; A (N, r, n),
    B (N, m, r); bias (N, m) or None; VA, VB like A, B or None (V = 0) -> (N, L, m):
        y_n = W_n x_n + s·B_n A_n x_n - s·V_Bn V_An x_n + b_n.
    """
    w = W.to(xs.dtype)
    y = torch.bmm(xs, w.transpose(-1, -2)) if W.ndim == 3 else F.linear(xs, w)
    d = _stacked_lora_term(xs, A, B)
    if VA is not None:
        d = d - _stacked_lora_term(xs, VA, VB)
    y = y + scale * d
    return y if bias is None else y + bias[:, None, :].to(y.dtype)


def fold_correction(W: torch.Tensor, VB: torch.Tensor, VA: torch.Tensor, scale: float, out=None) -> torch.Tensor:
    """W - s·V_B V_A: W (m, n) with VB (m, r), VA (r, n) -> (m, n), or with VB (N, m, r),
    VA (N, r, n) -> (N, m, n) (one folded base per head). `out=W` folds in place (W must be a
    transient the caller owns, e.g. a fresh dequantization)."""
    if VB.ndim == 3:
        if not isinstance(scale, float | int):  # per-head scales
            return torch.baddbmm(W.expand(VB.shape[0], *W.shape[-2:]), VB.to(W.dtype) * -_per_head(scale, W),
                                 VA.to(W.dtype))
        return torch.baddbmm(W.expand(VB.shape[0], *W.shape[-2:]), VB.to(W.dtype), VA.to(W.dtype), alpha=-scale)
    if out is not None:
        return out.addmm_(VB.to(W.dtype), VA.to(W.dtype), alpha=-scale)
    return torch.addmm(W, VB.to(W.dtype), VA.to(W.dtype), alpha=-scale)


def fold_is_cheaper(tokens: int, m: int, n: int) -> bool:
    """Whether folding V into the base (one (m, r) x (r, n) product per use, m·n·r MACs) beats
    applying it to the tokens (tokens·r·(m+n) MACs), per forward and per input gradient alike."""
    return m * n < tokens * (m + n)


def one_head_keeps_fold(quant: str, variant: str, shapes, max_bytes: int) -> bool:
    """Whether a one-head model keeps each layer's folded base W - s·V (one fp32 (m, n) per
    layer, `shapes` = [(m, n), ...]) between uses instead of folding it per use: only the exact
    variant has a V to fold, only an fp32 base (quant "none") is W itself, so that the fold is
    all a use would recompute, and only when all of them fit: 4·Σ m·n <= max_bytes (the model's
    base once more; `LTEConfig.fold_max_bytes`, the stacked engine's budget for its folds)."""
    return quant == "none" and variant == "exact" and 4 * sum(m * n for m, n in shapes) <= max_bytes


class _LTELinear(torch.autograd.Function):
    """The LTE layer's forward and backward written out, so that each step is one BLAS call
    that accumulates into its output, with no full-size temporaries in between: the plain
    composition spends ~6 extra passes over (N, L, m)/(N, L, n) tensors per layer (scaling,
    the bias add, the sum of the base and LoRA outputs and of their input gradients), and
    4 more kernel calls when V is applied to the tokens.

    Shapes: xs (N, L, n); A (N, r, n); B (N, m, r); bias (N, m) or None; VA, VB like A, B, or
    None when V is 0 or already folded into the base. `base()` returns W as (m, n) shared by
    every head or (N, m, n) per head; it is called again in the backward rather than saved,
    so a base dequantized (or folded) on the fly lives only while its matmul runs.

    With V given, [A; V_A] (N, 2r, n) and [s·B, -s·V_B] (N, m, 2r) make the LoRA term and its
    correction one rank-2r product; only the first r rows/columns get gradients.
    """

    @staticmethod
    def forward(ctx, xs, A, B, bias, VA, VB, base, scale):
        # Under autocast every matmul runs in the autocast dtype, chosen here once: autocast
        # itself is off inside, because it would not cast the in-place accumulations.
        dev = xs.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype
        ctx.dtypes = (xs.dtype, A.dtype, B.dtype, None if bias is None else bias.dtype)
        with torch.autocast(dev, enabled=False):
            xs = xs.to(dt)
            Af, Bf = _lora_factors(A, B, VA, VB, scale, dt)
            h = torch.bmm(xs, Af.transpose(1, 2))  # (N, L, R)
            if bias is None:
                y = torch.bmm(h, Bf.transpose(1, 2))
            else:
                y = torch.baddbmm(bias.to(dt)[:, None, :], h, Bf.transpose(1, 2))
            _base_matmul(y, xs, base().to(dt))
        # The factors themselves are saved, not Af and Bf: those are copies as large as the head
        # (with V, all of A, B, V_A, V_B), and rebuilding them in the backward is cheap.
        ctx.save_for_backward(xs, h, A, B, VA, VB)
        ctx.base, ctx.r, ctx.scale = base, A.shape[1], scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xs, h, A, B, VA, VB = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        x_dt, A_dt, B_dt, bias_dt = ctx.dtypes
        r = ctx.r
        gx = gA = gB = gbias = None
        with torch.autocast(xs.device.type, enabled=False):
            Af, Bf = _lora_factors(A, B, VA, VB, ctx.scale, xs.dtype)
            g = g.to(xs.dtype).contiguous()
            if need_x or need_A:
                gh = torch.bmm(g, Bf)  # (N, L, R): s·B_nᵀ g [, -s·V_Bnᵀ g]
            if need_x:
                w = ctx.base().to(g.dtype)
                gx = torch.bmm(g, w) if w.ndim == 3 else torch.mm(g.reshape(-1, g.shape[-1]), w).view(xs.shape)
                gx = gx.baddbmm_(gh, Af).to(x_dt)
            if need_A:
                gA = torch.bmm(gh[..., :r].transpose(1, 2), xs).to(A_dt)
            if need_B:
                gB = torch.bmm(g.transpose(1, 2), h[..., :r]).mul_(ctx.scale).to(B_dt)
            if need_bias:
                gbias = g.sum(1).to(bias_dt)
        return gx, gA, gB, gbias, None, None, None, None


def _lora_factors(A, B, VA, VB, scale, dt) -> tuple[torch.Tensor, torch.Tensor]:
    """`_LTELinear`'s factors in dtype dt: Af = [A; V_A] (N, R, n) and Bf = [s·B, -s·V_B]
    (N, m, R), R = 2r; without V, A (N, r, n) and s·B (N, m, r)."""
    Af, Bf = A.to(dt), B.to(dt) * scale
    if VA is not None:
        Af = torch.cat([Af, VA.to(dt)], 1)
        Bf = torch.cat([Bf, VB.to(dt) * -scale], 2)
    return Af, Bf


def _base_matmul(y, xs, w):
    """y += W x in place: y (N, L, m), xs (N, L, n), w (m, n) shared or (N, m, n) per head."""
    if w.ndim == 3:
        y.baddbmm_(xs, w.transpose(1, 2))
    else:
        y.view(-1, y.shape[-1]).addmm_(xs.reshape(-1, xs.shape[-1]), w.t())


class _LTEFoldedLinear(torch.autograd.Function):
    """The LTE layer with each head's LoRA term folded into its own base for this step:
    W_n' = W_n + s·B_n A_n (N, m, n), then y_n = W_n' x_n + b_n as one batched matmul.

    Against `_LTELinear` this trades the forward's (A x)·sBᵀ and the backward's gh·A, L·r·(m+n)
    MACs per head (L tokens), for the fold's m·n·r: cheaper where m·n < L·(m+n)
    (`fold_is_cheaper`). The cost is memory: W_n' is kept from the forward to the backward, an
    fp32 (N, m, n) per layer while the step runs (the caller's budget, `LTEConfig.fold_max_bytes`).
    The backward still needs A x, for ∇B: it is computed there, not saved.

    Shapes: xs (N, L, n); A (N, r, n); B (N, m, r); bias (N, m) or None; `base()` returns W as
    (m, n) shared or (N, m, n) per head (the exact variant's W - s·V_n, see `_folded`); scale a
    float or (N, 1, 1)."""

    @staticmethod
    def forward(ctx, xs, A, B, bias, base, scale):
        dev = xs.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype
        ctx.dtypes = (xs.dtype, A.dtype, B.dtype, None if bias is None else bias.dtype)
        with torch.autocast(dev, enabled=False):
            xs, Af, Bf = xs.to(dt), A.to(dt), B.to(dt)
            w = base().to(dt)
            w = w.expand(B.shape[0], *w.shape[-2:])
            if isinstance(scale, float | int):
                folded = torch.baddbmm(w, Bf, Af, alpha=scale)
            else:
                folded = torch.baddbmm(w, Bf * scale.to(dt), Af)
            if bias is None:
                y = torch.bmm(xs, folded.transpose(1, 2))
            else:
                y = torch.baddbmm(bias.to(dt)[:, None, :], xs, folded.transpose(1, 2))
        ctx.save_for_backward(xs, folded, A, B)
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xs, folded, A, B = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        x_dt, A_dt, B_dt, bias_dt = ctx.dtypes
        s = ctx.scale if isinstance(ctx.scale, float | int) else ctx.scale.to(xs.dtype)
        gx = gA = gB = gbias = None
        with torch.autocast(xs.device.type, enabled=False):
            g = g.to(xs.dtype).contiguous()
            if need_x:
                gx = torch.bmm(g, folded).to(x_dt)
            if need_A:
                gA = torch.bmm(torch.bmm(g, B.to(g.dtype)).transpose(1, 2), xs).mul_(s).to(A_dt)
            if need_B:
                gB = torch.bmm(g.transpose(1, 2), torch.bmm(xs, A.to(xs.dtype).transpose(1, 2))).mul_(s).to(B_dt)
            if need_bias:
                gbias = g.sum(1).to(bias_dt)
        return gx, gA, gB, gbias, None, None


def lte_linear(xs, base, A, B, bias, VA, VB, scale):
    """The fast LTE layer (same arguments and result as `lte_linear_plain`, with `base` a
    callable returning W, see `_LTELinear`)."""
    return _LTELinear.apply(xs.contiguous(), A, B, bias, VA, VB, base, scale)


def lte_linear_folded(xs, base, A, B, bias, scale):
    """`lte_linear` with V = 0 (or V already in `base`) through `_LTEFoldedLinear`: each head's
    LoRA term folded into its base for the step (same result up to float rounding)."""
    return _LTEFoldedLinear.apply(xs.contiguous(), A, B, bias, base, scale)


# ----------------------------------------------------------------------------------- layers
class LoRALinear(nn.Module):
    """One LTE head wrapping an `nn.Linear`: the base is frozen (optionally quantized), A, B and
    the bias (a replica) train. Shapes: base (m, n), lora_A (r, n), lora_B (m, r).

    Memory: the worker holds q(W) and, while one layer's matmul runs, one transient fp32 (m, n)
    (q(W) dequantized, or W - s·V folded); nothing m×n is kept between layers. `cache_base =
    True` keeps that fp32 matrix per layer instead (4·m·n bytes each: the whole model in fp32
    once more) and spares its recomputation in every forward and input gradient; the base
    itself (`base.parts()`, the state dict, what is sent or merged) stays W either way.
    `HeadLTE` turns it on for an fp32 base with the exact variant when the model's folds fit in
    `LTEConfig.fold_max_bytes` (`one_head_keeps_fold`); for a quantized base it stays opt-in:
    4·m·n bytes against q(W)'s ~m·n/2 undoes what a 4-bit worker holds q(W) for.
    `impl = "plain"` runs the op-by-op reference (`lte_linear_plain`) instead of `lte_linear`.
    """

    impl = "fast"
    cache_base = False

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
        if linear.weight.is_meta:  # a skeleton (lte_fed/worker.py): q(W) arrives later, W never exists here
            self.base = QuantizedWeight((m, n), quant)
        else:
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
        if self.impl == "plain":
            y = self.base.linear(x) + self.scale * _lora_term(x, self.lora_A, self.lora_B, self.corr_A, self.corr_B)
            return y if self.bias is None else y + self.bias
        m, n = self.out_features, self.in_features
        xs = x.reshape(1, -1, n)
        # The exact variant's V goes into the (transient) base when that is the cheaper matmul.
        fold = self.corr_A is not None and (self.cache_base or fold_is_cheaper(xs.shape[1], m, n))
        VA, VB = (None, None) if fold or self.corr_A is None else (self.corr_A[None], self.corr_B[None])
        bias = None if self.bias is None else self.bias[None]
        y = lte_linear(xs, lambda: self._base_weight(fold), self.lora_A[None], self.lora_B[None], bias, VA, VB,
                       self.scale)
        return y.view(*x.shape[:-1], m)

    def _base_weight(self, fold: bool) -> torch.Tensor:
        """W (m, n) as the matmul uses it: q(W) dequantized, minus s·V if `fold`."""
        if self.cache_base:
            key = (_versions(*self.base.parts().values(), self.corr_A, self.corr_B), fold, self.scale)
            return _cached(self, "_base_cache", key, lambda: self._make_base_weight(fold))
        return self._make_base_weight(fold)

    def _make_base_weight(self, fold: bool) -> torch.Tensor:
        w = self.base.dequantize()
        if not fold:
            return w
        # Fold in place into a fresh dequantization; W held in full precision must be copied.
        return fold_correction(w, self.corr_B, self.corr_A, self.scale, out=None if self.base.fmt == "none" else w)

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

    `fold` (exact variant): keep W_q - s·V_n per head (`_folded`, N·m·n floats) so that V costs
    nothing per step; without it V is applied to the tokens as part of one rank-2r product.
    `fold_steps`: where it is the cheaper matmul (`fold_is_cheaper` at the step's tokens per
    head), also fold each head's s·B_n A_n into its base for the step (`_LTEFoldedLinear`: N·m·n
    floats more, held from the forward to the backward); only where the bases are kept, never
    on a node that dequantizes per use. `cache_base`: keep q(W) dequantized (m·n floats).
    `impl = "plain"`: the op-by-op reference.
    """

    impl = "fast"
    cache_base = True

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
        fold: bool = True,
        fold_steps: bool = False,
        ranks: list[int] | None = None,
        scales: list[float] | None = None,
    ):
        super().__init__()
        _check(rank, variant)
        if len(generators) != heads:
            raise ValueError("one generator per head is required")
        m, n = linear.weight.shape
        # Heads of different rank (`ranks`, one per head) are zero-padded to the largest, which
        # changes nothing (`pad_rank`), each with its own scale (`scales`, default alpha / rank).
        self.ranks = [rank] * heads if ranks is None else [int(r) for r in ranks]
        if len(self.ranks) != heads or min(self.ranks) <= 0:
            raise ValueError(f"one positive rank per head is required, got {ranks!r}")
        rank = max(self.ranks)
        self.in_features, self.out_features, self.rank, self.heads = n, m, rank, heads
        self.scale = alpha / rank
        head_scales = [alpha / r for r in self.ranks] if scales is None else [float(x) for x in scales]
        if len(set(head_scales)) > 1:
            self.register_buffer("head_scales", torch.tensor(head_scales), persistent=False)
        else:
            self.scale, self.head_scales = head_scales[0], None
        self.variant = variant
        self.init = init
        self.quant = quant
        self.mode = "split"
        self.fold = fold
        self.fold_steps = fold_steps
        if linear.weight.is_meta:
            # A skeleton (a Flower node's stacked heads, lte_fed/worker.py): q(W) arrives later and
            # W never exists here (quant none: W itself is what arrives). Such a layer trains; it
            # cannot merge (the server merges), and dequantizes per use like a worker's LoRALinear.
            self.register_buffer("weight", torch.zeros((m, n) if quant == "none" else (0,)))
            self.base = None if quant == "none" else QuantizedWeight((m, n), quant)
            self.cache_base = False
        else:
            self.register_buffer("weight", linear.weight.detach().clone().float())
            self.base = None if quant == "none" else QuantizedWeight.from_weight(self.weight, quant)
        self.lora_A = nn.Parameter(torch.stack([F.pad(init_lora_A(r, n, init, g), (0, 0, 0, rank - r))
                                                for r, g in zip(self.ranks, generators)]))
        self.lora_B = nn.Parameter(torch.zeros(heads, m, rank))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().expand(heads, m).clone())
        if variant == "exact":
            self.register_buffer("corr_A", torch.zeros(heads, rank, n))
            self.register_buffer("corr_B", torch.zeros(heads, m, rank))
        else:
            self.corr_A = self.corr_B = None

    @torch.no_grad()
    def reset_head(self, n: int, generator: torch.Generator | None) -> None:
        """Slice n as built: A drawn from `generator` (what the constructor draws for that head;
        None: A is left for the caller to overwrite), B and V zero."""
        if generator is not None:
            r = self.ranks[n]
            self.lora_A[n].copy_(F.pad(init_lora_A(r, self.in_features, self.init, generator), (0, 0, 0, self.rank - r)))
        self.lora_B[n].zero_()
        if self.corr_A is not None:
            self.corr_A[n].zero_()
            self.corr_B[n].zero_()

    def _base_weight(self) -> torch.Tensor:
        """The shared base W (m, n) the forward uses: W itself, or q(W) dequantized once and
        reused until the packed tensors change (a merge, a load, a move). The fused engine holds
        W in full precision anyway, so one more copy costs what W costs, and spares the two
        dequantizations per layer per step that a memory-bound worker pays. `cache_base = False`
        dequantizes on every use instead (what a worker does; same values)."""
        if self.base is None:
            return self.weight
        if not self.cache_base:
            return self.base.dequantize()
        return _cached(self, "_deq_cache", _versions(*self.base.parts().values()), self.base.dequantize)

    def _folded(self) -> torch.Tensor:
        """Per-head bases W_q - s·V_n, (N, m, n), kept until W, q(W) or V change (at merges).
        Costs N·m·n floats, and makes the exact variant's step cost the reset variant's: V is
        never applied to the tokens. A worker that dequantizes per use (`cache_base = False`
        with a quantized base) folds per use too, where that pays (`_fold_pays`): it holds q(W)
        and its heads, and the fp32 folds (8× an NF4 q(W) per head; one head folds into its
        fresh dequantization) only while one layer's matmul runs. Same values."""
        def make():
            w = self.weight if self.base is None else self.base.dequantize()
            if self._per_use and self.heads == 1:
                # a fresh dequantization is a transient this layer owns: fold into it
                return fold_correction(w, self.corr_B[0], self.corr_A[0], self.s, out=w).unsqueeze(0)
            return fold_correction(w, self.corr_B, self.corr_A, self.s)

        if self._per_use:
            return make()
        key = (_versions(self.weight, *(() if self.base is None else self.base.parts().values()),
                         self.corr_A, self.corr_B, self.head_scales), self.scale)
        return _cached(self, "_fold_cache", key, make)

    def _fold_pays(self, tokens: int) -> bool:
        """Whether to fold V into the base for this forward: always when the folds are kept (they
        cost nothing per step); when they are made per use (a node's q(W), dequantized per use),
        only where the fold is the cheaper matmul (`fold_is_cheaper`, as a worker's LoRALinear
        decides), else V goes to the tokens in the rank-2r product, with no second (m, n)."""
        return not self._per_use or fold_is_cheaper(tokens, self.out_features, self.in_features)

    @property
    def _per_use(self) -> bool:
        """Whether q(W) is dequantized (and V folded) afresh at every use: a node's layer."""
        return self.base is not None and not self.cache_base

    @property
    def s(self) -> "float | torch.Tensor":
        """The scale: one float, or (N,) per-head scales when the heads' ranks differ."""
        return self.scale if self.head_scales is None else self.head_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, s = self.heads, self.s
        if self.mode == "sum":
            if self.head_scales is not None:
                raise ValueError("multi-head LoRA (mode 'sum') needs heads of one rank")
            y = F.linear(x, self._base_weight().to(x.dtype))
            A = self.lora_A.reshape(N * self.rank, -1)  # (N r, n)
            B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # (m, N r)
            y = y + (s / N) * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
            return y if self.bias is None else y + self.bias.mean(0)
        if x.shape[0] % N:
            raise ValueError(f"batch of {x.shape[0]} does not split into {N} heads")
        xs = x.reshape(N, -1, self.in_features)  # head n owns the n-th slice of the batch
        if not isinstance(s, float):
            s = s.to(xs.dtype).view(-1, 1, 1)
        exact = self.corr_A is not None
        if self.impl == "plain":
            y = lte_linear_plain(xs, self._base_weight(), self.lora_A, self.lora_B, self.bias, self.corr_A,
                                 self.corr_B, s)
        elif self.fold_steps and (self.fold or not exact) and not self._per_use and \
                fold_is_cheaper(xs.shape[1], self.out_features, self.in_features):
            y = lte_linear_folded(xs, self._folded if exact else self._base_weight, self.lora_A, self.lora_B,
                                  self.bias, s)
        elif exact and self.fold and self._fold_pays(xs.shape[1]):
            y = lte_linear(xs, self._folded, self.lora_A, self.lora_B, self.bias, None, None, s)
        else:
            y = lte_linear(xs, self._base_weight, self.lora_A, self.lora_B, self.bias, self.corr_A, self.corr_B, s)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self, step=None, average_bias: bool = True, factors=None) -> None:
        """W <- W + Δ with Δ = (1/N) Σ s_n (B_n A_n - V_n) (s_n per head when ranks differ, else
        one s), or W + step(Δ) (an outer optimizer, lte_fed/outer.py); then V <- B A (exact) or
        B <- 0 (reset); biases averaged unless the caller merges them (`average_bias=False`);
        q(W) refreshed. `factors` = (B, A, V_B, V_A) stacked like lora_B, lora_A (zero-padded to
        this layer's rank; V: None for 0) computes Δ from what the server received instead of
        the heads' own factors (a compressed uplink, lte_fed/uplink.py)."""
        B, A, VB, VA = factors if factors is not None else (self.lora_B, self.lora_A, self.corr_B, self.corr_A)
        delta = merge_update(B, A, VB, VA, self.s).to(self.weight)
        self.weight += delta if step is None else step(delta)
        commit_factors(self.lora_A, self.lora_B, self.corr_A, self.corr_B, self.variant)
        if self.bias is not None and average_bias:
            self.bias.copy_(self.bias.mean(0, keepdim=True).expand_as(self.bias))
        if self.base is not None:
            self.base.set_weight(self.weight)

    def merged_weight(self) -> torch.Tensor:
        """What W would be after a merge now, without changing anything: (m, n)."""
        return self.weight + merge_update(self.lora_B, self.lora_A, self.corr_B, self.corr_A, self.s).to(self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}->{self.out_features}, heads={self.heads}, rank={self.rank}, "
            f"scale={self.scale:g}, {self.variant}, base={self.quant}"
        )


def _versions(*tensors) -> tuple:
    """A key that changes whenever any of `tensors` is written to or replaced (None allowed)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


def _cached(owner: nn.Module, slot: str, key, make):
    """make(), computed again only when `key` changes; kept on `owner` as a plain attribute (a
    cache: never in the state dict, rebuilt after a load or a move)."""
    hit = owner.__dict__.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    # Drop the stale value (the slot and this frame's reference) before making the new one:
    # never two of them alive at once.
    owner.__dict__.pop(slot, None)
    del hit
    value = make()
    owner.__dict__[slot] = (key, value)
    return value


def set_impl(model: nn.Module, impl: str) -> None:
    """Run every LTE layer of `model` with the fast path ("fast") or the op-by-op reference
    ("plain"); both compute the same numbers up to float rounding."""
    if impl not in ("fast", "plain"):
        raise ValueError(impl)
    for m in model.modules():
        if isinstance(m, (LoRALinear, StackedLoRALinear)):
            m.impl = impl


def _check(rank: int, variant: str) -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lte.rank must be a positive integer, got {rank!r}")
    if variant not in VARIANTS:
        raise ValueError(f"lte.variant={variant!r} is not one of {', '.join(VARIANTS)}")
