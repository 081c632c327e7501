"""The server's outer optimizer: what a merge does with the heads' averaged update.

A merge forms, per LoRA layer, the heads' mean update Δ = (s/N) Σ_n (B_n A_n − V_n) (m, n), and
per replica Δ = mean_n(replica_n) − replica (the merged value of the last merge). `lte.outer`
says what is added to the model:

    avg       W ← W + Δ                                   (the paper's merge)
    nesterov  m ← μ m + Δ;  W ← W + lr (Δ + μ m)          (DiLoCo's outer SGD with Nesterov
                                                           momentum, written for −Δ as the
                                                           pseudo-gradient)
    adam      m ← β1 m + (1−β1) Δ;  v ← β2 v + (1−β2) Δ²;  t ← t + 1
              W ← W + lr m̂ / (√v̂ + ε)                      (m̂, v̂ bias-corrected)

with lr = lte.outer_lr, μ = β1 = lte.outer_momentum, β2 = lte.outer_beta2, ε = lte.outer_eps.
Replicas get the same rule on their own Δ, so with lr 1 and μ 0 nesterov is bit-identical to
avg (Δ + 0·m = Δ, and a replica's new value is written mean + (update − Δ) = mean + 0).

The exact variant's invariant does not depend on the rule: after a merge each head sets
V_n = B_n A_n, so it computes (W_new − s V_n + s B_n A_n) x = W_new x whatever W_new is.

Both engines call the same `outer_update`; its state (m, v, t per tensor) is a flat dict of
tensors ("<name>.m", ...) that goes into either engine's safetensors checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import LTESpec

OUTERS = ("avg", "nesterov", "adam")  # also in spec.py's validation, through this name


@dataclass(frozen=True)
class OuterConfig:
    """The `lte.outer*` keys; defaults are the Spec's (lte_fed/spec.py)."""

    kind: str = LTESpec.outer
    lr: float = LTESpec.outer_lr
    momentum: float = LTESpec.outer_momentum
    beta2: float = LTESpec.outer_beta2
    eps: float = LTESpec.outer_eps

    def __post_init__(self):
        if self.kind not in OUTERS:
            raise ValueError(f"lte.outer={self.kind!r} is not one of {', '.join(OUTERS)}")

    @property
    def is_avg(self) -> bool:
        return self.kind == "avg"


def outer_config(spec) -> OuterConfig:
    """The `lte.outer*` keys of a Spec (their defaults live in lte_fed/spec.py)."""
    s = spec.lte
    return OuterConfig(s.outer, float(s.outer_lr), float(s.outer_momentum), float(s.outer_beta2), float(s.outer_eps))


@torch.no_grad()
def outer_update(delta: torch.Tensor, state: dict[str, torch.Tensor], cfg: OuterConfig
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step to add for the averaged update `delta` (any shape), and the new state.

    `state` ({} before the first step) is not changed: the caller commits the returned one, so a
    merge that turns out non-finite leaves the optimizer as it was. avg returns `delta` itself.
    """
    if cfg.kind == "avg":
        return delta, state
    if cfg.kind == "nesterov":
        m = state.get("m")
        m = delta.clone() if m is None else m * cfg.momentum + delta
        return (delta + cfg.momentum * m) * cfg.lr, {"m": m}
    m, v = state.get("m"), state.get("v")
    t = int(state["t"].item()) + 1 if "t" in state else 1
    b1, b2 = cfg.momentum, cfg.beta2
    m = delta * (1 - b1) if m is None else m * b1 + delta * (1 - b1)
    v = delta.square() * (1 - b2) if v is None else v * b2 + delta.square() * (1 - b2)
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps), {"m": m, "v": v, "t": torch.tensor([t], dtype=torch.int64)}


class OuterOptimizer:
    """`outer_update` for every tensor of a model, keyed by name; `propose` computes without
    changing anything, `commit` keeps what was proposed (the Flower merge commits only once the
    whole merge is known finite)."""

    def __init__(self, cfg: OuterConfig):
        self.cfg = cfg
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def propose(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The step for tensor `name` given its averaged update `delta`."""
        if self.cfg.is_avg:
            return delta
        step, self._pending[name] = outer_update(delta, self.state.get(name, {}), self.cfg)
        return step

    def propose_mean(self, name: str, mean: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """A replica's new value: `anchor` (its last merged value) plus the step for Δ = mean −
        anchor, written mean + (step − Δ) so that a step equal to Δ gives `mean` bit for bit."""
        if self.cfg.is_avg:
            return mean
        delta = mean - anchor
        return mean + (self.propose(name, delta) - delta)

    def commit(self) -> None:
        self.state.update(self._pending)
        self._pending = {}

    def discard(self) -> None:
        self._pending = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors "<name>.<m|v|t>" for a checkpoint."""
        return {f"{name}.{k}": t for name, st in self.state.items() for k, t in st.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, k = key.rpartition(".")
            if k not in ("m", "v", "t") or not name:
                raise ValueError(f"outer optimizer state: unexpected tensor {key!r}")
            state.setdefault(name, {})[k] = t
        self.state, self._pending = state, {}
