"""The head ledger and one round's merge: the server side of LTE, in one place.

The ledger keeps one record per head:
- `state`: the head as of its last merge — A, B, the V factors (corr_A, corr_B) and the merged
  replicas, in `HeadLTE.head_state(with_corr=True)` names. It is what a node taking the head
  over restores, and what the merge subtracts (V) from a reply.
- `holder`: the node known to hold the head's latest local state (None: nobody; restore it).
- `committed`: the head's last update was merged, so its worker applies the post-merge rule
  (`lora.commit_factors`) before training on.
- `fresh`: the head never trained; a worker draws its init from (seed, head).

A round (`RoundMerge`): every reply goes through the protocol gate (`protocol.screen_reply`;
first answer per head wins), then through the update-size guard; the survivors are merged into
temporaries, which are checked finite, and only then are W, the replicas and the ledger
committed. A rejected reply therefore changes nothing but its own head's record (which falls
back to the server's copy), and a round whose every reply is bad leaves W and every head state
bit-identical.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field

import torch

from . import protocol as P
from .lora import commit_factors, merge_update_heads
from .outer import OuterOptimizer
from .uplink import reconstruct, wire_layout

log = logging.getLogger("lte_fed.server")

# An update is measured against the layer's ‖W‖_F, but never against less than this RMS per
# entry: a zero-initialised layer (or bias) must still be allowed to learn.
UPDATE_RMS_FLOOR = 1e-2


@dataclass
class HeadRecord:
    state: dict[str, torch.Tensor]
    holder: int | None = None
    committed: bool = False
    fresh: bool = True


class HeadLedger:
    """Every head's record; saved as tensors ("head.<n>.<key>") plus JSON-able flags."""

    def __init__(self, states: list[dict[str, torch.Tensor]]):
        self.records = [HeadRecord({k: t.detach().float().clone() for k, t in s.items()}) for s in states]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, head: int) -> HeadRecord:
        return self.records[head]

    def forget_holders(self) -> None:
        """After a restart no node is known to hold anything until it proves it."""
        for r in self.records:
            r.holder = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{n}.{k}": t for n, r in enumerate(self.records) for k, t in r.state.items()}

    def flags(self) -> list[dict]:
        return [{"committed": r.committed, "fresh": r.fresh} for r in self.records]

    def load(self, tensors: dict[str, torch.Tensor], flags: list[dict]) -> None:
        if len(flags) != len(self.records):
            raise ValueError(f"checkpoint has {len(flags)} heads, this run {len(self.records)}")
        for n, r in enumerate(self.records):
            prefix = f"head.{n}."
            state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            if state.keys() != r.state.keys():
                raise ValueError(f"checkpoint's head {n} has other tensors than this run's")
            r.state, r.committed, r.fresh, r.holder = state, bool(flags[n]["committed"]), bool(flags[n]["fresh"]), None


@dataclass(frozen=True)
class Guard:
    """Bounds on one head's update in one round (0 disables a bound).

    max_ratio: ‖s(B_n A_n − V_n)‖_F ≤ max_ratio · max(‖W‖_F, floor) in every LoRA layer, and
      ‖replica_n − replica‖ ≤ max_ratio · max(‖replica‖, floor) for every replica.
    max_outlier: with 3 or more heads in the round, a head's update norm in a layer is at most
      max_outlier times the median of the other heads' (so one wild head cannot hide behind W's
      size when W is large).
    """

    max_ratio: float = 10.0
    max_outlier: float = 20.0


def update_norm(B: torch.Tensor, A: torch.Tensor, VB: torch.Tensor | None, VA: torch.Tensor | None,
                scale: float) -> float:
    """‖s(B A − V_B V_A)‖_F without forming the m×n matrix: B (m, r), A (r, n).

    With L = [B, −V_B] (m, 2r) and R = [A; V_A] (2r, n): ‖L R‖²_F = Σ (LᵀL) ∘ (R Rᵀ). In float64,
    so absurd factors (1e20) give a huge or inf norm instead of NaN.
    """
    L, R = B.double(), A.double()
    if VB is not None:
        L, R = torch.cat([L, -VB.double()], 1), torch.cat([R, VA.double()], 0)
    sq = float(((L.T @ L) * (R @ R.T)).sum())
    return abs(scale) * math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else math.inf


def _reference(t: torch.Tensor) -> float:
    """The size an update of `t` is measured against: ‖t‖, floored at UPDATE_RMS_FLOOR RMS."""
    return max(float(t.double().norm()), UPDATE_RMS_FLOOR * math.sqrt(t.numel()))


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """‖new − old‖ / `_reference(old)`, in float64 (inf where it overflows)."""
    d = float((new.double() - old.double()).norm())
    return d / _reference(old) if math.isfinite(d) else math.inf


@dataclass
class RoundResult:
    merged: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = math.nan


class RoundMerge:
    """One round on the server: `receive` each reply, then `close` to merge what survived.

    W: layer name -> (m, n) fp32; replicas: name -> tensor; both are replaced (never mutated in
    place) only when the merge commits.
    """

    def __init__(self, rnd: int, ledger: HeadLedger, W: dict[str, torch.Tensor], replicas: dict[str, torch.Tensor],
                 layout: dict, *, scale: float | dict[int, float], variant: str, guard: Guard = Guard(),
                 layouts: dict[int, dict] | None = None, partial: str = "all",
                 outer: OuterOptimizer | None = None, uplink: str = "fp32"):
        """`scale`: s, or head -> s when heads differ in rank; `layouts`: head -> its reply layout
        where it differs from `layout` (another rank); `partial`: what a round where only some
        heads arrived divides their sum by (run.partial_merge: "all" N, or "arrived" |S|);
        `outer`: the outer optimizer (None: the plain average); `uplink`: comm.up, what replies
        look like (each head's wire layout follows from its own layout)."""
        self.rnd, self.ledger, self.W, self.replicas, self.outer = rnd, ledger, W, replicas, outer
        self.uplink = uplink
        self.layout, self.scale, self.exact, self.guard = layout, scale, variant == "exact", guard
        self.layouts, self.partial = layouts or {}, partial
        self.sent: dict[int, int] = {}  # head -> node it was sent to this round
        self.got: dict[int, tuple[int, dict[str, torch.Tensor], float]] = {}  # head -> (node, state, loss)
        self.rejected: dict[int, str] = {}

    def expect(self, head: int, node: int) -> None:
        self.sent[head] = node

    def receive(self, head: int, content=None, error: str | None = None, *, arrays: str = P.HEAD,
                metrics: str = P.METRICS) -> str | None:
        """Screen one reply for `head` (its records `arrays`, `metrics`: a node's reply carries
        one pair per head); returns why it was rejected, or None if it was kept."""
        if head not in self.sent:
            return self._reject(None, head, "reply for a head not sent this round")
        if head in self.got or head in self.rejected:
            return self._reject(None, head, "a second answer for this head (the first one counts)")
        head_layout = self.layouts.get(head, self.layout)
        verdict = P.screen_reply(content, wire_layout(head_layout, self.uplink), head, error, arrays=arrays,
                                 metrics=metrics)
        if verdict.reason is not None:
            return self._reject(head, head, verdict.reason)
        # A compressed reply is the round's change: the head is the ledger's copy plus it.
        state = reconstruct(self.ledger[head].state, verdict.state, self.uplink, head_layout)
        self.got[head] = (self.sent[head], state, verdict.train_loss)
        return None

    def _reject(self, record_head: int | None, head: int, reason: str) -> str:
        node = self.sent.get(head)
        log.error("round %d: head %s (node %s) not merged: %s", self.rnd, head, node, reason)
        if record_head is not None:
            self.rejected[record_head] = reason
        return reason

    # ------------------------------------------------------------------------- closing
    def close(self, min_heads: int = 1) -> RoundResult:
        for head in sorted(set(self.sent) - set(self.got) - set(self.rejected)):
            self._reject(head, head, "no reply")
        self._guard()
        good = {h: v for h, v in sorted(self.got.items())}
        for h, (node, _, _) in good.items():  # kept, merged or not: its node holds its state
            self.ledger[h].holder, self.ledger[h].committed = node, False
        for h in self.rejected:  # its local state is suspect or gone: restore it next time
            self.ledger[h].holder, self.ledger[h].committed = None, False
        losses = [loss for _, _, loss in good.values()]
        result = RoundResult([], dict(self.rejected), sum(losses) / len(losses) if losses else math.nan)
        if len(good) < min_heads:
            log.error("round %d: %d good head(s) < run.min_heads=%d: nothing merged this round",
                      self.rnd, len(good), min_heads)
            return result
        new_W, new_replicas = self._merged({h: s for h, (_, s, _) in good.items()})  # damped inside
        bad = [k for k, t in (new_W | new_replicas).items() if not torch.isfinite(t).all()]
        if bad:
            log.error("round %d: the merge would make %r non-finite: nothing merged this round", self.rnd, bad[0])
            if self.outer is not None:
                self.outer.discard()
            for h in good:
                self.ledger[h].holder = None
                result.rejected[h] = f"merge not finite ({bad[0]})"
            return result
        self.W.update(new_W)
        self.replicas.update(new_replicas)
        if self.outer is not None:
            self.outer.commit()
        for h, state in ((h, s) for h, (_, s, _) in good.items()):
            self._commit(h, state)
        for r in self.ledger.records:
            r.state.update({k: v.clone() for k, v in self.replicas.items()})
        result.merged = list(good)
        return result

    def _guard(self) -> None:
        """Reject heads whose update is out of proportion (Guard)."""
        g = self.guard
        norms = {h: self._norms(h, s) for h, (_, s, _) in self.got.items()}
        refs = {name: _reference(t) for name, t in (self.W | self.replicas).items()} if norms else {}
        for h, layer_norms in norms.items():
            reason = None
            for name, d in layer_norms.items():
                ref = refs[name]
                if g.max_ratio and not d <= g.max_ratio * ref:
                    reason = f"update of {name!r} is {d:.3g}, over {g.max_ratio:g}x its size {ref:.3g}"
                    break
                others = [norms[o][name] for o in norms if o != h]
                if g.max_outlier and name in self.W and len(others) >= 2:
                    med = statistics.median(others)
                    if med > 0 and not d <= g.max_outlier * med:
                        reason = f"update of {name!r} is {d:.3g}, over {g.max_outlier:g}x the other heads' median {med:.3g}"
                        break
            if reason:
                del self.got[h]
                self._reject(h, h, reason)

    def scale_of(self, head: int) -> float:
        return self.scale[head] if isinstance(self.scale, dict) else self.scale

    def _norms(self, head: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        saved = self.ledger[head].state
        out = {}
        for name in self.W:
            VB = saved[f"{name}.corr_B"] if self.exact else None
            VA = saved[f"{name}.corr_A"] if self.exact else None
            out[name] = update_norm(state[f"{name}.lora_B"], state[f"{name}.lora_A"], VB, VA, self.scale_of(head))
        for name, r in self.replicas.items():
            out[name] = float((state[name].double() - r.double()).norm())
        return out

    @torch.no_grad()
    def _merged(self, good: dict[int, dict[str, torch.Tensor]]) -> tuple[dict, dict]:
        """W + step(Δ) with Δ = (1/|S|) Σ_{n∈S} s_n (B_n A_n − V_n) (heads of any rank,
        `merge_update_heads`), and the replicas' mean over S (heads in order, so the sums are
        deterministic). step is the identity without an outer optimizer, else its step for Δ
        (lte_fed/outer.py: proposed here, committed with the merge).

        run.partial_merge=all with only a share |S|/N of the heads arrived damps Δ (and each
        replica's change) by that share BEFORE the outer step: the outer optimizer's
        pseudo-gradient is then the sum over S divided by N, and its momentum from earlier
        rounds is not damped. With avg this is exactly W + (|S|/N) Δ."""
        heads = sorted(good)
        share = len(heads) / len(self.ledger) if self.partial == "all" and len(heads) < len(self.ledger) else 1.0
        new_W = {}
        for name, W in self.W.items():
            saved = [self.ledger[h].state for h in heads]
            delta = merge_update_heads([
                (good[h][f"{name}.lora_B"], good[h][f"{name}.lora_A"],
                 st[f"{name}.corr_B"] if self.exact else None, st[f"{name}.corr_A"] if self.exact else None,
                 self.scale_of(h)) for h, st in zip(heads, saved)])
            if share != 1.0:
                delta = delta * share
            new_W[name] = W + (delta if self.outer is None else self.outer.propose(name, delta))
        new_replicas = {}
        for name, old in self.replicas.items():
            mean = torch.stack([good[h][name].float() for h in heads]).mean(0)
            if share != 1.0:
                mean = old + share * (mean - old)
            new_replicas[name] = mean if self.outer is None else self.outer.propose_mean(name, mean, old)
        return new_W, new_replicas

    def _commit(self, head: int, reply: dict[str, torch.Tensor]) -> None:
        """The ledger's copy of `head` after its update was merged (the post-merge rule)."""
        rec = self.ledger[head]
        for name in self.W:
            A, B = reply[f"{name}.lora_A"].float().clone(), reply[f"{name}.lora_B"].float().clone()
            VA, VB = (rec.state[f"{name}.corr_A"], rec.state[f"{name}.corr_B"]) if self.exact else (None, None)
            commit_factors(A, B, VA, VB, "exact" if self.exact else "reset")
            rec.state[f"{name}.lora_A"], rec.state[f"{name}.lora_B"] = A, B
        rec.committed, rec.fresh = True, False
