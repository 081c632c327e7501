"""Least squares with one merged LoRA head (paper appendix A.3, Figure 11), on CPU in seconds.

A linear model y = W x (32x32, W starts at 0) is fitted to y = W* x, x ~ N(0, I), with a rank-4
LoRA (`LoRALinear`, variant "reset": at every merge W <- W + s B A, then B <- 0; optimizer state
kept). Without merging the model is stuck at rank 4 and plateaus; merging every T steps lets it
climb to the full-rank target, faster for smaller T.

Like the paper's A.3, A is re-drawn at every merge. With ONE head that is what makes merging
work: with A kept, W only ever gains rows in span(A), and A moves only while B != 0 (its gradient
is s·Bᵀ·G), so with T = 1 it never moves at all (`--keep-a` shows it). LTE proper keeps A and
gets the rank from N heads with different A instead.

    python examples/least_squares.py --steps 3000 --out least_squares.png
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lte_fed.lora import LoRALinear, init_lora_A
from lte_fed.rng import torch_generator


def make_target(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """W* (dim, dim) of the given rank with ||W*||_F ≈ sqrt(dim) (so y has unit-scale entries)."""
    u = torch.randn(dim, rank, generator=generator)
    v = torch.randn(rank, dim, generator=generator)
    w = u @ v
    return w * (dim**0.5 / w.norm())


def effective_weight(layer: LoRALinear) -> torch.Tensor:
    """What the layer computes: W + s B A (reset variant, no correction), (dim, dim)."""
    return layer.base.dequantize() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()


def run(steps: int, merge_every: int | None, seed: int = 0, *, dim: int = 32, target_rank: int = 32,
        rank: int = 4, alpha: float = 8.0, lr: float = 0.005, batch: int = 64, optimizer: str = "sgd",
        eval_every: int = 10, keep_a: bool = False) -> list[float]:
    """Train, merging every `merge_every` steps (None: never); returns the relative error
    ||W_eff - W*||_F / ||W*||_F after every `eval_every` steps (first entry: before training).

    Runs on one thread: for 32x32 matmuls, handing work to other threads costs far more than
    the work (75x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(steps, merge_every, seed, dim, target_rank, rank, alpha, lr, batch, optimizer, eval_every, keep_a)
    finally:
        torch.set_num_threads(threads)


def _run(steps, merge_every, seed, dim, target_rank, rank, alpha, lr, batch, optimizer, eval_every, keep_a):
    g = torch_generator(seed, 0)
    target = make_target(dim, target_rank, g)
    plain = nn.Linear(dim, dim, bias=False)
    nn.init.zeros_(plain.weight)  # start from W = 0: everything must come through LoRA
    layer = LoRALinear(plain, rank, alpha, variant="reset", init="orthogonal", quant="none", generator=g)
    params = [layer.lora_A, layer.lora_B]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)

    def error() -> float:
        return float((effective_weight(layer) - target).norm() / target.norm())

    errors = [error()]
    for step in range(1, steps + 1):
        x = torch.randn(batch, dim, generator=g)
        loss = (layer(x) - x @ target.T).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if merge_every and step % merge_every == 0:
            with torch.no_grad():  # W <- W + s B A, then B <- 0 (optimizer state kept)
                layer.base.set_weight(effective_weight(layer))
            layer.commit_merge()
            if not keep_a:  # a fresh direction for the next T steps (paper A.3)
                with torch.no_grad():
                    layer.lora_A.copy_(init_lora_A(rank, dim, "orthogonal", g))
        if step % eval_every == 0:
            errors.append(error())
    return errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--merge-every", type=int, nargs="*", default=[1, 10, 50, 200])
    p.add_argument("--target-rank", type=int, nargs="*", default=[32, 8])
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default: 0.005 (sgd), 0.01 (adam)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-a", action="store_true", help="keep A at merges instead of re-drawing it")
    p.add_argument("--out", default="least_squares.png")
    args = p.parse_args(argv)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "adam" else 0.005)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.target_rank), figsize=(5 * len(args.target_rank), 4), squeeze=False)
    for ax, target_rank in zip(axes[0], args.target_rank):
        for t in [None, *args.merge_every]:
            errs = run(args.steps, t, args.seed, target_rank=target_rank, lr=lr, optimizer=args.optimizer,
                       keep_a=args.keep_a)
            label = "no merge" if t is None else f"merge every {t}"
            print(f"target rank {target_rank:2d}  {label:>16}: final relative error {errs[-1]:.4f}")
            ax.plot([10 * i for i in range(len(errs))], errs, label=label)
        ax.set(title=f"target rank {target_rank}, LoRA rank 4", xlabel="step", ylabel="||W - W*|| / ||W*||",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
