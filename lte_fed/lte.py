"""Turning a plain model into its LTE form, and back.

    head = parameterize_head(model, cfg, head=3)   # one worker's model: one head, q(W)
    stacked = parameterize(model, cfg)             # all N heads in one model (fused engine)
    plain_state = stacked.export_plain_state()     # loads into the original architecture

Every parameter of the plain model becomes exactly one of:
- LoRA: the weight of an `nn.Linear` (after `convert.prepare`, which also turns patch convs
  and nn.MultiheadAttention into Linears). The weight becomes the frozen base W; A and B train.
- replica: a tensor each head trains its own copy of and the merge averages — biases, kept
  norm affines, embeddings and token-like tensors (positional embedding, class token: leading
  dimension 1). Replicating a matrix would defeat LTE, so any other ≥2-D parameter is refused.
Building fails with `ParameterizeError` naming the parameter if one is neither, and naming the
module if it is a BatchNorm or keeps persistent buffers: nothing merges or exports them.

Head n's A matrices are drawn from a generator seeded by (seed, n), layer after layer in module
order, so the one-head model of head n and head n of the stacked model start identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .convert import NORM_TYPES, PrepareRecord, prepare, to_original_state
from .lora import (INITS, VARIANTS, LoRALinear, StackedLoRALinear, commit_factors, head_scale, one_head_keeps_fold,
                   pad_rank)
from .quant import check_format
from .spec import LTESpec, QuantSpec, RunSpec

if TYPE_CHECKING:
    from .outer import OuterOptimizer


class ParameterizeError(ValueError):
    """A model cannot be put in LTE form; the message names the parameter."""


@dataclass(frozen=True)
class LTEConfig:
    """The layer-level settings of `lte.*` (job.lte_config builds one from a Spec); the defaults
    are the Spec's, so the library and the CLI never disagree."""

    heads: int = LTESpec.heads
    rank: int = LTESpec.rank
    alpha: float = LTESpec.alpha
    variant: str = LTESpec.variant
    init: str = LTESpec.init
    quant: str = QuantSpec.base
    keep_norm_affine: bool = LTESpec.keep_norm_affine
    seed: int = RunSpec.seed
    rank_scale: str = LTESpec.rank_scale  # how s depends on a head's rank when ranks differ (lora.head_scale)
    # The fused engine folds the exact variant's V_n into per-head bases W - s·V_n (N·m·n fp32
    # per layer) when all of them together fit in this many bytes; otherwise V is applied to
    # the tokens every step (exact LTE then costs 4·r(m+n)/(m·n) more per token than reset).
    # When the step's folds fit too (N·m·n fp32 per layer more, during a step), each head's
    # s·B_n A_n is folded into its base for the step where that is the cheaper matmul
    # (StackedLoRALinear `fold_steps`).
    fold_max_bytes: int = 4 * 2**30

    def __post_init__(self):
        if not isinstance(self.heads, int) or self.heads <= 0:
            raise ValueError(f"lte.heads must be a positive integer, got {self.heads!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lte.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lte.alpha must be > 0, got {self.alpha!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"lte.variant={self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise ValueError(f"lte.init={self.init!r} is not one of {', '.join(INITS)}")
        check_format(self.quant)
        if not isinstance(self.fold_max_bytes, int) or self.fold_max_bytes < 0:
            raise ValueError(f"fold_max_bytes must be a non-negative integer, got {self.fold_max_bytes!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------- classification
@dataclass
class Plan:
    """Where every parameter of a prepared plain model goes."""

    lora: list[str]  # module names of the Linears that get LoRA
    replicas: dict[str, tuple[int, ...]]  # parameter name -> shape
    record: PrepareRecord


def plan(model: nn.Module, keep_norm_affine: bool = False) -> Plan:
    """Prepare `model` in place and decide, for every parameter, LoRA or replica."""
    record = prepare(model, keep_norm_affine)
    _refuse_unmergeable_state(model)
    lora = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    lora_weights = {f"{n}.weight" for n in lora}
    modules = dict(model.named_modules())
    replicas = {}
    for name, p in model.named_parameters():
        if name in lora_weights:
            continue
        owner = modules[name.rpartition(".")[0]]
        # token-like: a (1, ...) tensor of the model's own (class token, positions), not a
        # convolution's kernel that happens to have one output channel
        token_like = p.shape[0] == 1 and not isinstance(owner, nn.modules.conv._ConvNd)
        if p.ndim <= 1 or isinstance(owner, (nn.Embedding, *NORM_TYPES)) or token_like:
            replicas[name] = tuple(p.shape)
            continue
        raise ParameterizeError(
            f"parameter {name!r} (shape {tuple(p.shape)}, in {type(owner).__name__}) is neither LoRA "
            "nor replica: LTE puts LoRA on nn.Linear and patch-embedding Conv2d (kernel == stride) "
            "only, and replicates only biases, norm affines, embeddings and token-like tensors. "
            "Replace that layer with Linears, or freeze it out of the model."
        )
    return Plan(lora, replicas, record)


def _refuse_unmergeable_state(model: nn.Module) -> None:
    """Refuse BatchNorm and any module with persistent buffers (state a forward may update).

    Heads would each update their own copy of such state, the merge has no rule for it and the
    export would leave it out, so the merged model would evaluate with its init-time statistics.
    BatchNorm is refused even without running statistics: in the fused engine its batch
    statistics would mix all heads' samples, so heads would no longer train independently.
    """
    for owner, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ParameterizeError(
                f"module {owner!r} ({type(m).__name__}): BatchNorm is not supported by LTE (its running "
                "statistics are neither merged nor exported, and its batch statistics would mix the "
                "heads' samples); use LayerNorm or GroupNorm"
            )
        for bname, buf in m._buffers.items():
            if buf is not None and bname not in m._non_persistent_buffers_set:
                raise ParameterizeError(
                    f"module {owner!r} ({type(m).__name__}) keeps buffer {bname!r}: state that LTE neither "
                    "merges across heads nor exports; register it with persistent=False if it is a "
                    "constant, or use a layer without it"
                )


@torch.no_grad()
def _materialize(net: nn.Module) -> None:
    """Give every tensor still on the meta device (a head built from a skeleton: its replicas;
    the LoRA layers' bases are already packed q(W) buffers) zeros on the CPU, in place. The
    worker loads the real values from the server's message before it trains."""
    for m in net.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None and t.is_meta:
                    new = torch.zeros(t.shape, dtype=t.dtype)
                    table[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def accounting(model: "HeadLTE | StackedLTE") -> dict[str, int]:
    """Parameter counts by role: trainable LoRA factors and replicas, the frozen base (m·n per
    LoRA layer), and trainable tensors that are neither ('unaccounted', must be 0)."""
    lora = {id(p) for l in model.lora_layers().values() for p in (l.lora_A, l.lora_B)}
    replica = {id(p) for p in model.parameters() if getattr(p, "_lte_replica", False)}
    counts = {"lora": 0, "replica": 0, "unaccounted": 0}
    for p in model.parameters():
        role = "lora" if id(p) in lora else "replica" if id(p) in replica else "unaccounted"
        if role != "unaccounted" or p.requires_grad:
            counts[role] += p.numel()
    counts["base"] = sum(l.in_features * l.out_features for l in model.lora_layers().values())
    return counts


# ------------------------------------------------------------------------------- one head
class HeadLTE(nn.Module):
    """One worker's model: head `head` of the LTE model, base held in `cfg.quant` format.

    `model` may be a skeleton on the meta device (lte_fed/worker.py): then no full-precision W
    is ever allocated; the bases and replicas start at zero and are loaded from the server's
    message. A is drawn from (seed, head) on the CPU either way, so both starts agree.

    State that travels (all keyed by names in the prepared model):
      base_state():  "<linear>.base.<part>" quantized base tensors (server -> worker)
      head_state():  "<linear>.lora_A/.lora_B", replicas by name; with_corr adds corr_A/corr_B
    """

    def __init__(self, model: nn.Module, cfg: LTEConfig, head: int):
        super().__init__()
        if not 0 <= head < cfg.heads:
            raise ValueError(f"head {head} is out of range for lte.heads={cfg.heads}")
        self.cfg, self.head = cfg, head
        net = copy.deepcopy(model)
        self.plan = plan(net, cfg.keep_norm_affine)
        gen = rng.torch_generator(cfg.seed, rng.INIT, head)
        for name in self.plan.lora:
            layer = LoRALinear(net.get_submodule(name), cfg.rank, cfg.alpha, variant=cfg.variant,
                               init=cfg.init, quant=cfg.quant, generator=gen)
            _set(net, name, layer)
        # An fp32 base with the exact variant keeps W - s·V per layer (4·m·n bytes) when all of
        # them fit in cfg.fold_max_bytes, as the stacked engine keeps its per-head folds: the
        # step then costs what the stacked engine's does per head (lora.one_head_keeps_fold).
        layers = [net.get_submodule(name) for name in self.plan.lora]
        keep = one_head_keeps_fold(cfg.quant, cfg.variant, [(l.out_features, l.in_features) for l in layers],
                                   cfg.fold_max_bytes)
        for layer in layers:
            layer.cache_base = keep
        _materialize(net)
        for name in self.plan.replicas:
            p = net.get_parameter(name)
            p._lte_replica = True
        self.net = net

    def forward(self, x):
        return self.net(x)

    def lora_layers(self) -> dict[str, LoRALinear]:
        return {n: self.net.get_submodule(n) for n in self.plan.lora}

    def base_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.base.{k}": t for n, l in self.lora_layers().items() for k, t in l.base.parts().items()}

    def load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, layer in self.lora_layers().items():
            layer.base.set_parts({k: state[f"{n}.base.{k}"] for k in layer.base.parts()})

    def head_state(self, with_corr: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for n, layer in self.lora_layers().items():
            out[f"{n}.lora_A"], out[f"{n}.lora_B"] = layer.lora_A.detach(), layer.lora_B.detach()
            if with_corr and layer.corr_A is not None:
                out[f"{n}.corr_A"], out[f"{n}.corr_B"] = layer.corr_A, layer.corr_B
        out.update(self.replica_state())
        return out

    def replica_state(self) -> dict[str, torch.Tensor]:
        return {n: self.net.get_parameter(n).detach() for n in self.plan.replicas}

    @torch.no_grad()
    def load_head_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = dict(self.net.named_parameters()) | dict(self.net.named_buffers())
        for k, t in state.items():
            if k not in own:
                if strict:
                    raise KeyError(f"unknown head-state key {k!r}")
                continue
            own[k].copy_(t)

    def commit_merge(self) -> None:
        for layer in self.lora_layers().values():
            layer.commit_merge()


# ---------------------------------------------------------------------------------- stacked
class _StackedAffineNorm(nn.Module):
    """A norm whose kept affine is per head: weight, bias (N, D) applied to each head's slice."""

    def __init__(self, norm: nn.LayerNorm, heads: int):
        super().__init__()
        if not isinstance(norm, nn.LayerNorm):
            raise ParameterizeError(
                f"{type(norm).__name__} with a kept affine cannot be stacked per head; "
                "set lte.keep_norm_affine=false or use run.engine=flower"
            )
        self.heads, self.mode = heads, "split"
        w, b = norm.weight, norm.bias
        self.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        self.weight = None if w is None else nn.Parameter(w.detach().expand(heads, *w.shape).clone())
        self.bias = None if b is None else nn.Parameter(b.detach().expand(heads, *b.shape).clone())

    def forward(self, x):
        y = self.norm(x)
        if self.mode == "sum":
            w = None if self.weight is None else self.weight.mean(0)
            b = None if self.bias is None else self.bias.mean(0)
        else:
            y = y.reshape(self.heads, -1, *self.norm.normalized_shape)
            w = None if self.weight is None else self.weight[:, None]
            b = None if self.bias is None else self.bias[:, None]
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y.reshape(x.shape)


class _StackedEmbedding(nn.Module):
    """An nn.Embedding replica per head: weight (N, V, D); the rows of head n's slice of the
    batch are looked up in head n's table (one gather over the N tables laid end to end)."""

    def __init__(self, emb: nn.Embedding, heads: int):
        super().__init__()
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
            raise ParameterizeError("an nn.Embedding with padding_idx, max_norm or sparse gradients cannot be "
                                    "stacked per head; use run.engine=flower")
        self.heads, self.mode = heads, "split"
        self.weight = nn.Parameter(emb.weight.detach().expand(heads, *emb.weight.shape).clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (N·b, ...) int64 -> (N·b, ..., D)."""
        if self.mode == "sum":
            return F.embedding(idx, self.weight.mean(0))
        N, V = self.heads, self.weight.shape[1]
        offset = (torch.arange(N, device=idx.device) * V).view(N, *[1] * idx.ndim)
        ids = (idx.reshape(N, -1, *idx.shape[1:]) + offset).reshape(idx.shape)
        return F.embedding(ids, self.weight.reshape(N * V, -1))


_STACKED_OWNERS = (StackedLoRALinear, _StackedAffineNorm, _StackedEmbedding)  # modules holding (N, ...) replicas


class StackedLTE(nn.Module):
    """All N heads in one model (fused engine). A batch of N·b samples is N slices, head n
    training on slice n; the base matmul of every Linear runs once for the whole batch.

    Token-like replicas (leading dim 1, e.g. pos_embed, cls_token) are held as (N, *shape)
    parameters named "<name>_heads" and expanded to one copy per sample before each forward;
    an nn.Embedding becomes one (N, V, D) table, head n's samples looked up in table n.
    `mode = "sum"` runs the model as multi-head LoRA (paper eq. 2) instead: every sample sees
    all heads, replicas are the mean of their copies.
    """

    def __init__(self, model: nn.Module, cfg: LTEConfig, head_ids: list[int] | None = None,
                 ranks: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        # The global ids of the heads held here, in slice order (default: all N). Head n's A is
        # drawn from (seed, n) whatever else is held, so a node with heads {4..7} starts them as
        # the fused engine's slices 4..7.
        self.head_ids = list(range(cfg.heads)) if head_ids is None else [int(h) for h in head_ids]
        if not self.head_ids or len(set(self.head_ids)) != len(self.head_ids) or \
                not all(0 <= h < cfg.heads for h in self.head_ids):
            raise ValueError(f"head ids {self.head_ids} must be distinct and in 0..{cfg.heads - 1}")
        N = len(self.head_ids)
        # Heads may differ in rank (one per node, say): each is zero-padded to the largest and
        # scaled by its own s (lora.head_scale); its state travels at its own rank.
        self.ranks = [cfg.rank] * N if ranks is None else [int(r) for r in ranks]
        if len(self.ranks) != N or min(self.ranks) <= 0:
            raise ValueError(f"ranks {ranks!r}: one positive rank per head is required")
        scales = [head_scale(cfg.alpha, r, cfg.rank, cfg.rank_scale) for r in self.ranks]
        net = copy.deepcopy(model)
        self.plan = plan(net, cfg.keep_norm_affine)
        gens = [rng.torch_generator(cfg.seed, rng.INIT, n) for n in self.head_ids]
        fold_bytes = 4 * N * sum(net.get_submodule(name).weight.numel() for name in self.plan.lora)
        # Built from a skeleton too (a node, lte_fed/worker.py: no W at build), the exact variant
        # folds W - s·V_n per head while training when all of them fit in cfg.fold_max_bytes, as
        # the fused engine does: the node then computes bit for bit what the fused engine does.
        # A node with a quantized base folds per use and keeps nothing m×n in fp32 between uses
        # (StackedLoRALinear._folded).
        # Folding the heads' s·B_n A_n into per-head bases for each step (`fold_steps`) holds
        # another N·m·n fp32 per layer while a step runs: on top of the kept folds, in the budget.
        kept = fold_bytes if cfg.variant == "exact" else 0
        for name in self.plan.lora:
            layer = StackedLoRALinear(net.get_submodule(name), N, cfg.rank, cfg.alpha, variant=cfg.variant,
                                      init=cfg.init, quant=cfg.quant, generators=gens,
                                      fold=fold_bytes <= cfg.fold_max_bytes,
                                      fold_steps=kept + fold_bytes <= cfg.fold_max_bytes, ranks=self.ranks,
                                      scales=scales)
            _set(net, name, layer)
        self._slots: list[tuple[str, str]] = []  # (owner module, attribute) of token-like replicas
        for name, shape in self.plan.replicas.items():
            owner_name, attr = _split(name)
            owner = net.get_submodule(owner_name)
            if isinstance(owner, _STACKED_OWNERS):
                continue  # biases live in the stacked layer; the norm's other affine is done
            if isinstance(owner, NORM_TYPES):
                _set(net, owner_name, _StackedAffineNorm(owner, N))
                continue
            if isinstance(owner, nn.Embedding):
                _set(net, owner_name, _StackedEmbedding(owner, N))
                continue
            if not shape or shape[0] != 1:
                raise ParameterizeError(
                    f"replica {name!r} (shape {shape}) has no leading batch dimension of 1, so the "
                    "fused engine cannot give each head its own copy; use run.engine=flower"
                )
            p = owner._parameters.pop(attr)
            owner.register_parameter(f"{attr}_heads", nn.Parameter(p.detach().expand(N, *shape).clone()))
            setattr(owner, attr, p.detach())  # a plain attribute, replaced before each forward
            self._slots.append((owner_name, attr))
        _materialize(net)  # a skeleton's replicas: zeros until the server's values are loaded
        self.net = net
        self.mode = "split"
        for p in self.replica_params().values():
            p._lte_replica = True

    # --- running
    def set_mode(self, mode: str) -> None:
        if mode not in ("split", "sum"):
            raise ValueError(mode)
        self.mode = mode
        for m in self.net.modules():
            if isinstance(m, _STACKED_OWNERS):
                m.mode = mode

    @property
    def n_heads(self) -> int:
        """Heads held here (the slices of a batch)."""
        return len(self.head_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = self.n_heads
        if self.mode == "split" and x.shape[0] % N:
            raise ValueError(f"batch of {x.shape[0]} does not split into {N} heads")
        for owner_name, attr in self._slots:
            owner = self.net.get_submodule(owner_name)
            stacked = owner.get_parameter(f"{attr}_heads")  # (N, 1, ...)
            if self.mode == "sum":
                value = stacked.mean(0)
            else:
                b = x.shape[0] // N
                value = stacked.expand(N, b, *stacked.shape[2:]).reshape(N * b, *stacked.shape[2:])
            setattr(owner, attr, value)
        return self.net(x)

    def lora_layers(self) -> dict[str, StackedLoRALinear]:
        return {n: self.net.get_submodule(n) for n in self.plan.lora}

    def replica_params(self) -> dict[str, nn.Parameter]:
        """Replica name (as in the plain model) -> its stacked (N, *shape) parameter."""
        out = {}
        for name in self.plan.replicas:
            owner_name, attr = _split(name)
            owner = self.net.get_submodule(owner_name)
            out[name] = owner.get_parameter(attr if isinstance(owner, _STACKED_OWNERS) else f"{attr}_heads")
        return out

    def head_params(self) -> list[nn.Parameter]:
        """Every trainable parameter; each has the heads as its leading dimension."""
        return [*(p for l in self.lora_layers().values() for p in (l.lora_A, l.lora_B)), *self.replica_params().values()]

    @torch.no_grad()
    def merge(self, outer: "OuterOptimizer | None" = None, anchors: dict[str, torch.Tensor] | None = None) -> None:
        """Merge every head into W and the replicas: the plain average, or through `outer`
        (lte_fed/outer.py), with `anchors` the replicas' values as of the last merge (updated
        here to the new ones). The outer state is committed."""
        if outer is None:
            for layer in self.lora_layers().values():
                layer.merge()  # also averages its bias
            for name, p in self.replica_params().items():
                if not isinstance(self.net.get_submodule(_split(name)[0]), StackedLoRALinear):
                    p.copy_(p.mean(0, keepdim=True).expand_as(p))
            return
        for name, layer in self.lora_layers().items():
            layer.merge(lambda delta, name=name: outer.propose(name, delta), average_bias=False)
        for name, p in self.replica_params().items():
            new = outer.propose_mean(name, p.mean(0), anchors[name])
            p.copy_(new.unsqueeze(0).expand_as(p))
            anchors[name] = new.clone()
        outer.commit()

    def replica_anchors(self) -> dict[str, torch.Tensor]:
        """Every replica's value as of now, taken from head 0 (right after a merge, or at init,
        all heads hold the same): what `merge(outer, anchors)` measures the next Δ from."""
        return {name: p[0].detach().clone() for name, p in self.replica_params().items()}

    # --- state
    def head_state(self, n: int, with_corr: bool = False) -> dict[str, torch.Tensor]:
        """Head n's state in the same layout as `HeadLTE.head_state` (at the head's own rank)."""
        out, r = {}, self.ranks[n]
        for name, l in self.lora_layers().items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = l.lora_A[n, :r].detach(), l.lora_B[n, :, :r].detach()
            if with_corr and l.corr_A is not None:
                out[f"{name}.corr_A"], out[f"{name}.corr_B"] = l.corr_A[n, :r], l.corr_B[n, :, :r]
        for name, p in self.replica_params().items():
            out[name] = p[n].detach().reshape(self.plan.replicas[name])
        return out

    @torch.no_grad()
    def load_head_state(self, n: int, state: dict[str, torch.Tensor]) -> None:
        """Write head slice n from a state in `head_state`'s layout (corr_* optional; replicas
        missing from `state` are left as they are)."""
        for name, l in self.lora_layers().items():
            pairs = [(l.lora_A, l.lora_B, "lora")]
            if l.corr_A is not None and f"{name}.corr_A" in state:
                pairs.append((l.corr_A, l.corr_B, "corr"))
            for A, B, kind in pairs:
                a, b = pad_rank(state[f"{name}.{kind}_A"], state[f"{name}.{kind}_B"], l.rank)
                A[n].copy_(a)
                B[n].copy_(b)
        self.load_replicas(state, [n])

    def head_cuts(self, n: int) -> list[tuple]:
        """For each of `head_params()`, the index of head n's own part of its slice (its rank's
        rows of A, columns of B; all of a replica): what of its optimizer state travels."""
        r = self.ranks[n]
        cuts = [c for _ in self.lora_layers() for c in ((slice(0, r),), (slice(None), slice(0, r)))]
        return cuts + [()] * len(self.replica_params())

    @torch.no_grad()
    def load_replicas(self, state: dict[str, torch.Tensor], slices: list[int] | None = None) -> None:
        """Copy the replicas named in `state` (plain shapes) into the given head slices (all)."""
        for name, p in self.replica_params().items():
            if name in state:
                for n in range(self.n_heads) if slices is None else slices:
                    p[n].copy_(state[name].reshape(p[n].shape))

    @torch.no_grad()
    def reset_head(self, n: int, head_id: int, draw: bool = True) -> None:
        """Make slice n head `head_id` as built (a node's model reused for other heads): A drawn
        from (seed, head_id) in layer order, exactly as the constructor draws it (`draw=False`:
        left for a load to overwrite), B and V zero. Replicas are the caller's to load."""
        self.head_ids[n] = int(head_id)
        gen = rng.torch_generator(self.cfg.seed, rng.INIT, int(head_id)) if draw else None
        for l in self.lora_layers().values():
            l.reset_head(n, gen)

    @torch.no_grad()
    def commit_head(self, n: int) -> None:
        """Head slice n's last update is in W now: V <- B A (exact) or B <- 0 (reset)."""
        for l in self.lora_layers().values():
            VA, VB = (None, None) if l.corr_A is None else (l.corr_A[n], l.corr_B[n])
            commit_factors(l.lora_A[n], l.lora_B[n], VA, VB, l.variant)

    @torch.no_grad()
    def load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        """q(W) as the server sends it ("<linear>.base.<part>", `HeadLTE.base_state` names)."""
        for name, l in self.lora_layers().items():
            if l.base is None:  # full-precision base: the one part is W itself
                l.weight.copy_(state[f"{name}.base.weight"])
            else:
                l.base.set_parts({k: state[f"{name}.base.{k}"] for k in l.base.parts()})

    @torch.no_grad()
    def plain_state(self) -> dict[str, torch.Tensor]:
        """The prepared plain model's state as it would be after a merge now (nothing changes)."""
        out = {}
        for name, l in self.lora_layers().items():
            out[f"{name}.weight"] = l.merged_weight().clone()
        for name, p in self.replica_params().items():
            out[name] = p.mean(0).reshape(self.plan.replicas[name]).clone()
        return out

    def export_plain_state(self) -> dict[str, torch.Tensor]:
        """The merged plain model (no LoRA), keyed and shaped for the original architecture."""
        return to_original_state(self.plan.record, self.plain_state())


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def parameterize(model: nn.Module, cfg: LTEConfig) -> StackedLTE:
    """All N heads of `model` in one stacked model (a copy; `model` is not changed)."""
    return StackedLTE(model, cfg)


def parameterize_head(model: nn.Module, cfg: LTEConfig, head: int) -> HeadLTE:
    """Head `head` of `model` for one worker (a copy; `model` is not changed)."""
    return HeadLTE(model, cfg, head)
