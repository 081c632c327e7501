"""One node's share of the heads: k >= 1 heads trained at once on one q(W), stacked as the fused
engine stacks all N (a Flower node runs this; the fused engine is the node holding every head).

The node's heads are an arbitrary subset of the global head ids. Head n keeps its identity
wherever it runs: its A is drawn from (seed, n) (`StackedLTE(head_ids=...)`), its batches from
shard n by (seed, n, step), and its state and AdamW moments travel per head, so any placement
of heads on nodes trains the same heads as the fused engine.

AdamW is elementwise, so one AdamW over the stacked (k, ...) parameters is k independent ones,
except for its step counter, which torch keeps per parameter, not per head. Heads that trained
the same rounds share it exactly. A head that joins a node without its moments (restored from
the server after its node was lost) starts with zero moments at the node's step count.
"""

from __future__ import annotations

import torch

from .lte import StackedLTE
from .train import autocast, optimizer_step, token_loss


def train_heads(model: StackedLTE, opt: torch.optim.Optimizer, source, start_step: int, steps: int, *,
                lr, clip: float, device: torch.device, precision: str = "fp32") -> list[list[float]]:
    """The local phase of every head of `model` at once: `steps` AdamW steps from global step
    `start_step`; slice i trains on head `model.head_ids[i]`'s batches. The same computation as
    the fused engine's step (the loss is the sum of the heads' losses, each head's gradient
    clipped on its own), on k heads instead of N.

    Returns the losses, [step][slice].
    """
    params = model.head_params()
    k = model.n_heads
    losses = []
    model.train()
    for step in range(start_step, start_step + steps):
        for g in opt.param_groups:
            g["lr"] = lr(step)
        parts = [source.batch(h, step, device) for h in model.head_ids]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with autocast(device, precision):
            logits = model(x).float()
        per_head = token_loss(logits, y).view(k, -1).mean(1)
        per_head.sum().backward()
        optimizer_step(opt, params, clip, heads=k)
        losses.append(per_head.detach().tolist())
    return losses


def head_optimizer_state(opt: torch.optim.Optimizer, n: int, cuts: list[tuple] | None = None) -> dict[str, torch.Tensor]:
    """Slice n of the optimizer's state: '<param index>.<key>', moments of shape p[n][cuts[i]]
    (the head's own rank, `StackedLTE.head_cuts`), step as is (empty before the first step)."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        cut = () if cuts is None else cuts[i]
        for key, v in st.items():
            v = torch.as_tensor(v)
            out[f"{i}.{key}"] = (v if key == "step" else v[n][cut]).detach().clone()
    return out


def load_head_optimizer_states(opt: torch.optim.Optimizer, params: list[torch.Tensor],
                               states: list[dict[str, torch.Tensor] | None],
                               cuts: list[list[tuple]] | None = None) -> None:
    """Stack per-head optimizer states (`head_optimizer_state` layout, one per slice; None or {}:
    the head has none) into `opt` over `params` (k, ...), each into its head's part `cuts[n][i]`
    (zero elsewhere: the rank padding). Nothing to load: a fresh optimizer."""
    have = [s for s in states if s]
    if not have:
        return
    step = max(float(s[f"{i}.step"]) for s in have for i in range(len(params)) if f"{i}.step" in s)
    state = {}
    for i, p in enumerate(params):
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            m = torch.zeros_like(p)
            for n, s in enumerate(states):
                if s and f"{i}.{key}" in s:
                    m[n][() if cuts is None else cuts[n][i]] = s[f"{i}.{key}"].to(p)
            moments[key] = m
        state[i] = {"step": torch.tensor(step), **moments}
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
