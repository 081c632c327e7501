"""Training pieces both engines share: schedule, devices and precision, one head's local steps,
per-head clipping, evaluation, and the head-alignment measures of paper appendix A.5.

The fused engine (engine.py) steps all heads of a StackedLTE at once; a Flower client steps
one HeadLTE with `train_head`. Both draw head n's batch of global step t with
`data.head_batch_indices(shard_n, t, b, seed, n)`, so they see the same data.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import text as T
from .spec import SpecError


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (step is 0-based).

    A warm-up longer than the run is cut to the run's length, so a short run (say, a 6-step
    smoke test under the default warm-up) warms up throughout instead of being refused."""
    warmup = min(warmup, total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"run.device: {name} but no CUDA device is available; use run.device=cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Mixed precision where the device supports it: bf16 on CUDA when available ('auto');
    fp32 on CPU ('auto'), where bf16 autocast is slower than fp32 on most machines."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def clip_per_head(params: list[torch.Tensor], max_norm: float, heads: int) -> torch.Tensor:
    """Clip each head's gradient norm separately. Every param has the heads as dim 0
    (with heads=1, any params: one worker's head).

    Returns the heads' norms before clipping, shape (N,).
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = _squared_norms(grads, heads, torch.float32)
    if not torch.isfinite(norms).all():  # a square past fp32's range (gradients ~1e19, a huge
        norms = _squared_norms(grads, heads, torch.float64)  # lte.alpha): clipping by inf zeroed them
    norms = norms.sqrt()
    if max_norm > 0:
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))
    return norms


def _squared_norms(grads: list[torch.Tensor], heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Each head's squared gradient norm (N,), summed in `dtype`."""
    norms = torch.zeros(heads, device=grads[0].device, dtype=dtype)
    for g in grads:
        norms += g.detach().to(dtype).reshape(heads, -1).pow(2).sum(1)
    return norms


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], clip: float, heads: int) -> None:
    """Clip each head's gradient (`clip_per_head`), step, and drop the gradients at once.

    Dropping them here, not before the next backward, is what keeps gradients and activations
    from coexisting: the next forward's saved activations would otherwise pile up on top of a
    whole set of gradients (one copy of the trainable parameters; for full training, of the
    model). The memory estimate (lte_fed/memory.py) counts the larger of the two, not their sum.
    """
    clip_per_head(params, clip, heads=heads)
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class BatchSource:
    """Where head n's batches come from: its shard of the training set and the seed."""

    data: D.ImageData
    shards: list[torch.Tensor]
    per_head_batch: int
    img_size: int
    augment: bool
    seed: int
    same_batch: bool = False  # every head draws head 0's batch (lte.same_batch; one-head methods)

    def batch(self, head: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        head = 0 if self.same_batch else head  # a Flower node asks for its own head's batch
        idx = D.head_batch_indices(self.shards[head], step, self.per_head_batch, self.seed, head)
        x, y = D.make_batch(self.data, idx, train=True, img_size=self.img_size, augment=self.augment,
                            seed=self.seed, head=head, step=step)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train_head(model: nn.Module, opt: torch.optim.Optimizer, source: BatchSource, head: int, start_step: int,
               steps: int, *, lr: "callable", clip: float, device: torch.device, precision: str = "fp32") -> list[float]:
    """One worker's local phase: `steps` AdamW steps of one head from global step `start_step`.

    Returns the per-step training losses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    model.train()
    for step in range(start_step, start_step + steps):
        for g in opt.param_groups:
            g["lr"] = lr(step)
        x, y = source.batch(head, step, device)
        with autocast(device, precision):
            loss = token_loss(model(x).float(), y).mean()
        loss.backward()
        optimizer_step(opt, params, clip, heads=1)
        losses.append(loss.item())
    return losses


def token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per prediction, flat: logits (B, C) and y (B,) for images, or (B, L, V) and
    (B, L) for language models -> (B,) or (B·L,), in batch order."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none")


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # foreach=False: the same per-tensor kernels in both engines, so their rounding agrees.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as flat tensors '<param index>.<key>' (step, exp_avg, exp_avg_sq): what a
    checkpoint or a worker's state file stores (the lr is set from the schedule every step)."""
    return {f"{i}.{k}": torch.as_tensor(v).detach().clone() for i, st in opt.state_dict()["state"].items()
            for k, v in st.items()}


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW keeps per parameter (make_optimizer)


def load_optimizer_tensors(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`, for state saved after at least one step. ValueError, naming
    it, for state that would not give back the same optimizer: none at all, a parameter's part
    missing, another shape or dtype, or NaN (torch would take most of these and fail, or train
    on wrong moments, only at the next step)."""
    if not flat:
        raise ValueError("no optimizer state (AdamW's moments are saved with every checkpoint)")
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]  # in state_dict's index order
    state: dict[int, dict] = {}
    for key, t in flat.items():
        i, _, k = key.partition(".")
        p = params[int(i)] if i.isdigit() and int(i) < len(params) else None
        if p is None or (t.ndim and (t.shape != p.shape or t.dtype != p.dtype)):
            raise ValueError(f"optimizer state {key!r} {tuple(t.shape)} {t.dtype} fits no parameter of this model")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"optimizer state {key!r} holds NaN or inf")
        state.setdefault(int(i), {})[k] = t
    for i, st in state.items():
        if st.keys() != ADAM_STATE:
            raise ValueError(f"optimizer state of parameter {i} holds {sorted(st)}, not {sorted(ADAM_STATE)}")
    sd["state"] = state
    opt.load_state_dict(sd)


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": t for k, t in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = prefix + "."
    return {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}


@torch.no_grad()
def evaluate(model: nn.Module, data: D.ImageData | T.TextData, img_size: int, device: torch.device, batch_size: int = 512,
             precision: str = "fp32") -> dict[str, float]:
    """A plain model on the held-out data: test loss and accuracy (%) for images; validation
    loss (nats per token) and perplexity for text (img_size is then unused)."""
    if isinstance(data, T.TextData):
        return _evaluate_text(model, data, device, batch_size, precision)
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in D.test_batches(data, batch_size, img_size):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return {"test_loss": loss_sum / total, "test_acc": 100.0 * correct / total}


def _evaluate_text(model: nn.Module, data: T.TextData, device: torch.device, batch_size: int,
                   precision: str) -> dict[str, float]:
    model.eval()
    windows = max(1, min(batch_size, 16384 // data.block_size))  # bounds the logits: windows x L x V
    total, loss_sum = 0, 0.0
    for x, y in T.val_batches(data, windows):
        with autocast(device, precision):
            logits = model(x.to(device)).float()
        loss_sum += token_loss(logits, y.to(device)).sum().item()
        total += y.numel()
    loss = loss_sum / total
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def headline(row: dict) -> str:
    """The evaluation part of a progress line: accuracy for images, loss and perplexity for text."""
    if "val_loss" in row:
        return f"val loss {row['val_loss']:.4f}, perplexity {row['perplexity']:.2f}"
    return f"test acc {row['test_acc']:.2f}%"


# ------------------------------------------------------------------ head alignment (A.5)
def head_alignment(B: torch.Tensor, A: torch.Tensor) -> dict[str, float]:
    """Mean pairwise |cosine similarity| and Grassmann distance of the heads' B_n A_n.

    B (N, m, r), A (N, r, n). Grassmann distance between the r-dim column spaces:
    sqrt(Σ θ_i²) with cos θ_i the singular values of U_iᵀ U_j (paper eq. 4 averages over pairs).
    """
    N, r = B.shape[0], B.shape[2]
    if N < 2:
        return {"head_cosine": float("nan"), "head_grassmann": float("nan")}
    prods = torch.einsum("hmr,hrn->hmn", B.float(), A.float())
    flat = prods.reshape(N, -1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    U = torch.linalg.svd(prods, full_matrices=False).U[:, :, :r]  # (N, m, r) column bases
    cos_sum = dist_sum = 0.0
    pairs = 0
    for i in range(N):
        for j in range(i + 1, N):
            s = torch.linalg.svdvals(U[i].T @ U[j]).clamp(-1.0, 1.0)
            dist_sum += float(torch.arccos(s).pow(2).sum().sqrt())
            cos_sum += float(cos[i, j].abs())
            pairs += 1
    return {"head_cosine": cos_sum / pairs, "head_grassmann": dist_sum / pairs}
