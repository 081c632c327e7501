"""A nanoGPT-style causal transformer, written so that LTE can parameterize it as it is.

    model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, mlp_dim=1152))
    logits = model(idx)                      # idx (B, L) int64 -> (B, L, vocab_size)
    out = model.generate(idx, 200, generator=g)

What LTE sees: every projection is an `nn.Linear` (fused qkv `c_attn`, `c_proj`, `c_fc`, the
output layer `lm_head`), so every one gets LoRA. The token embedding `wte` is an `nn.Embedding`
and the position embedding `wpe` a (1, block_size, n_embd) tensor: both are replicas (each head
trains its own copy, the merge averages them; the fused engine stacks wpe like ViT's pos_embed).

Weight tying. nanoGPT ties `wte.weight` to `lm_head.weight`. Under LTE one tensor cannot be both
a frozen LoRA base (the output layer: W + s·B·A, merged every T steps) and a replica (the
embedding: a full copy per head, averaged). So these models are *untied*: the output layer is
LoRA, the embedding a replica, and both start from the same matrix (`lm_head.weight` is a copy
of `wte.weight` at init), so the model at init equals the tied one. Full training trains the same
untied architecture, so every method compares like with like. For a vocabulary of 65 this adds
25k parameters; for GPT-2's 50,304 it adds 38.6 M (163 M instead of 124 M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_dim: int = 1536
    bias: bool = False  # biases in Linears and LayerNorms (nanoGPT: False is a bit better and faster)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); position t attends to positions <= t."""
        b, l, d = x.shape
        q, k, v = self.c_attn(x).reshape(b, l, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H)
        return self.c_proj(y.transpose(1, 2).reshape(b, l, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # A (1, L, D) tensor rather than an nn.Embedding: a token-like replica with a leading
        # dimension of 1, which the fused engine gives each head a copy of (as ViT's pos_embed).
        self.wpe = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """nanoGPT's init (GPT-2's): N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)),
        zero biases; the untied output layer starts as a copy of the embedding (module doc)."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                nn.init.normal_(p, 0.0, 0.02)
        self.lm_head.weight.copy_(self.wte.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, L) int64 token ids, L <= block_size -> logits (B, L, vocab_size)."""
        l = idx.shape[1]
        if l > self.cfg.block_size:
            raise ValueError(f"sequence of {l} tokens is longer than block_size={self.cfg.block_size}")
        x = self.wte(idx) + self.wpe[:, :l]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
        """Continue idx (B, L) by max_new_tokens sampled tokens -> (B, L + max_new_tokens).

        temperature 0 is greedy decoding; otherwise samples from softmax(logits / temperature),
        restricted to the top_k most likely tokens, drawn from `generator`. on_token(): called
        after each token (a progress bar).
        """
        start = idx.shape[1]
        out = torch.empty(idx.shape[0], start + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :start] = idx  # filled in place: appending token by token would copy it all each time
        for t in range(start, start + max_new_tokens):
            logits = self(out[:, max(0, t - self.cfg.block_size):t])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            out[:, t] = nxt[:, 0]
            if on_token is not None:
                on_token()
        return out
