"""Per-device memory of one LTE client next to full-model AdamW training (paper §4.5).

The paper's accounting: a DDP device holds the model M plus 2M of AdamW state (3M, gradients
left out); an LTE device holds the quantized base qM plus 3·M_lte (head + AdamW state). Here
every term is in bytes and explicit, with gradients and activations added, because on a real
device those are what decides whether a job fits:

    LTE client  = base q(W) + head (A, B [+ V_A, V_B for `exact`] + replicas)
                + max(AdamW (2 × trainable) + dequant buffer + max(activations, grads),
                      2 × message)
    full AdamW  = weights (fp32) + AdamW (2 × P) + max(activations, grads (1 × P))

Why max(activations, grads) and not their sum: backward frees each layer's saved activations
as it produces that layer's gradients, and every training loop drops the gradients as soon as
the optimizer has stepped (`train.optimizer_step`), so the two never coexist in full. The peak
is at the start of backward (all activations) or at the optimizer step (all gradients),
whichever is larger. Measured peaks of real ClientApp processes confirm it (docs/performance.md §4).

Base bytes per LoRA'd Linear (m, n), matching `lte_fed.quant` / bitsandbytes exactly:
    nf4/fp4: ceil(m·n / 2) packed + 4 · ceil(m·n / 64) absmax (fp32, one per 64-block)
    nf4-dq/fp4-dq: ceil(m·n / 2) packed + b absmax (uint8, b = ceil(m·n / 64) blocks)
             + 4 · ceil(b / 256) second-level absmax + 4 (the absmax offset)
    int8:    m·n + 4 · m  (fp32 absmax per row)
    none:    4 · m·n
The dequant buffer is one fp32 copy of the largest Linear (the forward and the input-gradient
rebuild W on the fly, one layer at a time). The exact variant needs it with a full-precision base
too: a client folds W - s·V into such a transient when that is the cheaper matmul
(`lora.fold_is_cheaper`, true at ViT sizes and batches), or, when the whole model's folds fit in
`LTEConfig.fold_max_bytes`, keeps W - s·V for every Linear (`lora.one_head_keeps_fold`): then
the buffer is 4·Σ m·n, the fp32 base once more.

The message: a federated worker gets q(W) and the merged replicas in the server's message
(base bytes + 4 · replica elements). While the model is built, Flower's arrays and the tensors
unpacked from them (a copy) sit next to the model they fill; then the ClientApp drops both
(clients/client_app.py `_drop_arrays`), so training never holds them. The peak is the larger
of that build and training. A full-training device has no message.

What is not here: the process's code and libraries (interpreter, torch, Flower, the model's
library: timm imports torchvision, ~190 MiB resident on CPU). They cost
the same whatever the model, so measurements are taken above a process that imported them
(benchmarks/deployment.py: the real ClientApp processes of a loopback deployment).

Activation model (fp32, what autograd saves for backward, transformer-like nets):
    act = batch · tokens · width · depth · ACT_FLOATS_PER_TOKEN · 4 bytes
          + LTE only: batch · tokens · rank · (#LoRA Linears) · k · 4 bytes,  k = 2 exact / 1 reset
Counting the tensors a timm ViT block saves gives 17 floats per token·width (LN inputs 2,
Linear inputs 1+1+1+4, attention q/k/v/out 4, GELU input 4); the LoRA path adds `A x` (and
`V_A x` for exact) of width r per Linear. The constant is that count, not a fit; the probe
(ViT-B/32, 224 px, CPU) measured what it predicts (see ACT_FLOATS_PER_TOKEN). Attention scores are not counted: the
fused SDPA kernels (CPU flash, CUDA flash/efficient) never store the tokens² matrix.
A language model adds its logits: batch · tokens · vocabulary · LOGIT_FLOATS · 4 bytes (what
cross-entropy saves, its log-softmax, and the logits' gradient at the start of backward; counted,
not measured).

Nothing on a client depends on the number of heads N: a client holds one head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .lora import fold_is_cheaper, one_head_keeps_fold
from .quant import BLOCKSIZE_4BIT, BLOCKSIZE_ABSMAX, check_format, four_bit

if TYPE_CHECKING:
    from .lte import LTEConfig

FP32 = 4
# Saved-for-backward floats per token per unit of width per block: 17 by counting (docstring).
# Checked, not fitted: in the probe's ViT-B/32 runs (batch 16, CPU) measured peak minus the
# resident terms came out at 18.0 (full) and 17.5 (LTE client) floats per token·width·block;
# the little left over is transient buffers the count of saved tensors does not include.
ACT_FLOATS_PER_TOKEN = 17.0
LOGIT_FLOATS = 2.0  # a language model's, per token and vocabulary entry (docstring)

# Generic family ladders (width, depth, attention heads) for `largest_fitting`; sizes past the
# registered ones follow the ViT paper (L, H) and are built directly with timm's class.
VIT_SIZES = {
    "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16),
}
FAMILIES = {
    "vit": list(VIT_SIZES),
    "mixer": ["mixer_tiny", "mixer_small", "mixer_base"],
    "tv_vit": ["tv_vit_small", "tv_vit_base"],
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (no weights)."""

    name: str
    linears: tuple[tuple[int, int], ...]  # (out, in) of every Linear that gets LoRA
    replica_elems: int  # trainable non-LoRA elements of one head (biases, pos_embed, ...)
    full_params: int  # parameters of the plain model (full training trains all of them)
    tokens: int  # tokens per sample the blocks see
    width: int
    depth: int
    vocab: int = 0  # a language model's logits per token (0: an image model)


def _build_meta(name: str, img_size: int, num_classes: int, patch_size: int | None, in_chans: int = 3) -> nn.Module:
    """The plain model on the meta device: shapes only, no memory, no init cost. A language
    model's `img_size` is its block size (0: its own) and `num_classes` its vocabulary."""
    from .models import build_lm, build_model, is_language_model, list_models

    if is_language_model(name):
        return build_lm(name, vocab_size=num_classes, block_size=img_size or None)
    if name in VIT_SIZES and name not in list_models():
        from timm.models.vision_transformer import VisionTransformer

        from .models import check_patches

        check_patches(img_size, patch_size or 32)
        width, depth, heads = VIT_SIZES[name]
        return VisionTransformer(img_size=img_size, patch_size=patch_size or 32, in_chans=in_chans,
                                 num_classes=num_classes, embed_dim=width, depth=depth, num_heads=heads,
                                 class_token=True, global_pool="token")
    return build_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, patch_size=patch_size)


def _gpt_config(model: nn.Module):
    """An lte_fed.gpt model's GPTConfig, None for any other model."""
    return model.cfg if hasattr(model, "wte") and hasattr(model, "cfg") else None


def _geometry(model: nn.Module) -> tuple[int, int, int]:
    """(tokens, width, depth) of the residual stream, read off the known architectures."""
    if gpt := _gpt_config(model):  # a window of block_size tokens
        return gpt.block_size, gpt.n_embd, gpt.n_layer
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # timm ViT
        return model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim, len(model.blocks)
    if hasattr(model, "blocks") and hasattr(model, "stem"):  # timm Mixer
        return model.stem.num_patches, model.embed_dim, len(model.blocks)
    if hasattr(model, "encoder") and hasattr(model, "seq_length"):  # torchvision ViT
        return model.seq_length, model.hidden_dim, len(model.encoder.layers)
    widest = max(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    return 1, widest, 1  # an MLP: one "token", its widest layer, one block


@functools.lru_cache(maxsize=64)  # shapes only, immutable: safe to share
def analyse(name: str, img_size: int = 224, num_classes: int = 100, patch_size: int | None = None,
            keep_norm_affine: bool = False, in_chans: int = 3) -> ModelShape:
    """Build `name` on the meta device and read off every size the estimate uses. A language
    model's `img_size` is its block size (0: the model's own) and `num_classes` its vocabulary.

    Uses `lte.plan` (the same surgery a worker does) so LoRA layers and replicas are exactly
    those of `HeadLTE`.
    """
    from .lte import plan

    with torch.device("meta"):
        model = _build_meta(name, img_size, num_classes, patch_size, in_chans)
        full = sum(p.numel() for p in model.parameters())
        tokens, width, depth = _geometry(model)
        p = plan(model, keep_norm_affine)
    linears = tuple(tuple(model.get_submodule(n).weight.shape) for n in p.lora)
    replicas = sum(math.prod(s) for s in p.replicas.values())
    gpt = _gpt_config(model)
    return ModelShape(name, linears, replicas, full, tokens, width, depth, gpt.vocab_size if gpt else 0)


def job_shape(job, keep_norm_affine: bool = False) -> ModelShape:
    """`analyse` for the model a job trains (lte_fed.job.Job): its data's classes and channels,
    or its vocabulary and block size."""
    s = job.spec
    if job.is_text:
        return analyse(s.model.name, s.model.block_size or 0, job.data.vocab_size, None, keep_norm_affine)
    return analyse(s.model.name, job.img_size, job.data.num_classes, s.model.patch_size, keep_norm_affine,
                   job.data.in_chans)


def base_bytes(m: int, n: int, fmt: str) -> int:
    """Bytes a worker holds for one frozen (m, n) base weight in format `fmt`."""
    check_format(fmt)
    elems = m * n
    if kind := four_bit(fmt):
        blocks = math.ceil(elems / BLOCKSIZE_4BIT)
        scales = blocks + FP32 * math.ceil(blocks / BLOCKSIZE_ABSMAX) + FP32 if kind[1] else FP32 * blocks
        return math.ceil(elems / 2) + scales
    if fmt == "int8":
        return elems + FP32 * m
    return FP32 * elems


def activation_bytes(shape: ModelShape, batch: int, lora_rank: int = 0, lora_saves: int = 0) -> int:
    """Saved-activation estimate (module docstring): the block term plus the LoRA path's."""
    block = batch * shape.tokens * shape.width * shape.depth * ACT_FLOATS_PER_TOKEN * FP32
    lora = batch * shape.tokens * lora_rank * len(shape.linears) * lora_saves * FP32
    logits = batch * shape.tokens * shape.vocab * LOGIT_FLOATS * FP32
    return int(block + lora + logits)


def _peak(terms: dict[str, int]) -> int:
    """Peak bytes (module docstring): the model plus the larger of its build (the message twice:
    Flower's arrays and the tensors unpacked from them) and its training (AdamW state, the
    dequant buffer, and the larger of activations and gradients, which do not coexist)."""
    model = terms["base"] + terms["trainable"]
    build = 2 * terms["message"]
    train = terms["optimizer"] + terms["workspace"] + max(terms["activations"], terms["grads"])
    return model + max(build, train)


def estimate_lte(shape: ModelShape, cfg: "LTEConfig", batch: int) -> dict[str, int]:
    """Bytes of one LTE client for `cfg` (rank, quant, variant). `cfg.heads` plays no part on
    purpose: a client holds one head whatever N is (tests assert it)."""
    rank, quant, variant = cfg.rank, cfg.quant, cfg.variant
    lora = sum(rank * (m + n) for m, n in shape.linears)
    trainable = lora + shape.replica_elems
    corr = lora if variant == "exact" else 0
    out = {
        "base": sum(base_bytes(m, n, quant) for m, n in shape.linears),
        "trainable": FP32 * (trainable + corr),
        "grads": FP32 * trainable,
        "optimizer": 2 * FP32 * trainable,
        "workspace": _workspace(shape, cfg, batch),
        "message": 0,
        "activations": activation_bytes(shape, batch, rank, 2 if variant == "exact" else 1),
    }
    out["message"] = out["base"] + FP32 * shape.replica_elems  # the server's q(W) + replicas, as Flower holds them
    out["total"] = _peak(out)
    return out


def _workspace(shape: ModelShape, cfg: "LTEConfig", batch: int) -> int:
    """The client's fp32 (m, n) buffers (module docstring): none for an fp32 base without V,
    every Linear's fold when the client keeps them, else one transient of the largest; with an
    fp32 base, plus the step's folds W + s·B A of the Linears where folding is the cheaper
    matmul at this batch (`lora.fold_is_cheaper`), when they fit in `fold_max_bytes` on top of
    the kept ones (lte.StackedLTE `fold_steps`)."""
    every = FP32 * sum(m * n for m, n in shape.linears)
    if one_head_keeps_fold(cfg.quant, cfg.variant, shape.linears, cfg.fold_max_bytes):
        held = every
    elif cfg.quant == "none" and cfg.variant != "exact":
        held = 0
    else:
        return FP32 * max(m * n for m, n in shape.linears)
    if held + every <= cfg.fold_max_bytes:
        held += FP32 * sum(m * n for m, n in shape.linears if fold_is_cheaper(batch * shape.tokens, m, n))
    return held


def estimate_full(shape: ModelShape, batch: int) -> dict[str, int]:
    """Bytes of full-model AdamW training (fp32) on one device at the same per-device batch."""
    P = shape.full_params
    out = {"base": FP32 * P, "trainable": 0, "grads": FP32 * P, "optimizer": 2 * FP32 * P,
           "workspace": 0, "message": 0, "activations": activation_bytes(shape, batch)}
    out["total"] = _peak(out)
    return out


def largest_fitting(family: str, device_bytes: int, cfg: "LTEConfig", batch: int, img_size: int = 224,
                    patch_size: int | None = None, num_classes: int = 100, in_chans: int = 3) -> dict[str, str | None]:
    """The largest model of `family` (smallest to largest in FAMILIES) whose estimate fits in
    `device_bytes`, for an LTE client and for full training; None where none fits."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is unknown; available: {', '.join(FAMILIES)}")
    best: dict[str, str | None] = {"lte": None, "full": None}
    for name in FAMILIES[family]:
        shape = analyse(name, img_size, num_classes, patch_size, cfg.keep_norm_affine, in_chans)
        if estimate_lte(shape, cfg, batch)["total"] <= device_bytes:
            best["lte"] = name
        if estimate_full(shape, batch)["total"] <= device_bytes:
            best["full"] = name
    return best


def family_of(name: str) -> str | None:
    """The FAMILIES key whose ladder holds `name`, or None."""
    return next((f for f, names in FAMILIES.items() if name in names), None)


def heads_that_fit(shape: ModelShape, cfg: "LTEConfig", per_head_batch: int, memory_bytes: float) -> int:
    """How many heads of `cfg.rank` a node with `memory_bytes` can train stacked (node config
    `memory-gb`): the base and the transient fp32 workspace are held once, and each head adds
    what `estimate_lte` counts for one head beyond them (its factors, V, AdamW moments, gradients
    or activations at its share of the batch). At least 0."""
    one = estimate_lte(shape, cfg, per_head_batch)
    shared = one["base"] + one["workspace"]
    return max(0, int((memory_bytes - shared) // max(1, one["total"] - shared)))
