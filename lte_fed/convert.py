"""Surgery that makes a plain model ready for LoRA, and the way back to its original names.

`prepare(model)` rewrites, in place, the parts LoRA cannot wrap as they are:
- a patch-embedding Conv2d (kernel == stride, no padding) becomes `PatchifyLinear`: cut the
  image into patches, then one `nn.Linear` on each flattened patch — the same function;
- `nn.MultiheadAttention` (which calls F.multi_head_attention_forward with its raw weights and
  so bypasses its Linear submodules) becomes `SelfAttention`, whose projections are Linears;
- norm layers lose their affine parameters (the paper found that better), unless kept.

The result is still a plain model computing the same function (up to the removed affines,
which were 1 and 0 at init). `to_original_state` maps the prepared model's state dict back to
the original architecture's names and shapes, so an export loads into a freshly built model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


class PatchifyLinear(nn.Module):
    """Conv2d(C, D, kernel=p, stride=p) as patchify + Linear(C·p·p, D).

    x (B, C, H, W) -> (B, D, H/p, W/p), like the conv it replaces. The Linear sees
    (B, H/p, W/p, C·p·p), batch first, so stacked heads can slice the batch.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        d, c, ph, pw = conv.weight.shape
        self.patch = (ph, pw)
        # on the conv's device: a skeleton on the meta device stays one (no weight is allocated)
        self.linear = nn.Linear(c * ph * pw, d, bias=conv.bias is not None, device=conv.weight.device)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(d, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch
        b, c, h, w = x.shape
        if h % ph or w % pw:
            raise ValueError(f"image {h}x{w} is not divisible into {ph}x{pw} patches")
        x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, h // ph, w // pw, c * ph * pw)  # same (c, i, j) order as conv weights
        return self.linear(x).permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    """Drop-in for `nn.MultiheadAttention` used as self-attention, with Linear projections.

    in_proj: Linear(D, 3D) (fused q, k, v), out_proj: Linear(D, D). Same call signature and
    result as the module it replaces (attention weights are not returned).
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only plain self-attention nn.MultiheadAttention can be converted")
        d = mha.embed_dim
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        dev = mha.in_proj_weight.device  # meta for a skeleton: nothing is allocated
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None, device=dev)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, device=dev)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key and key is value):
            raise ValueError("converted attention supports self-attention only (query is key is value)")
        if key_padding_mask is not None:
            raise ValueError("converted attention does not support key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, D): batch first
        b, l, d = x.shape
        q, k, v = self.in_proj(x).reshape(b, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, l, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


@dataclass
class PrepareRecord:
    """What `prepare` changed, by name in the prepared model, to map state back."""

    patchify: list[str] = field(default_factory=list)  # prefixes of PatchifyLinear modules
    attention: list[str] = field(default_factory=list)  # prefixes of SelfAttention modules
    removed_affine: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)  # name -> (shape, fill)
    conv_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # patchify prefix -> conv weight shape


def _is_patch_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == m.stride
        and m.padding in ((0, 0), 0, "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
    )


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def prepare(model: nn.Module, keep_norm_affine: bool = False) -> PrepareRecord:
    """Rewrite `model` in place (see module docstring); returns what changed."""
    rec = PrepareRecord()
    for name, m in list(model.named_modules()):
        if _is_patch_conv(m):
            rec.patchify.append(name)
            rec.conv_shapes[name] = tuple(m.weight.shape)
            _set_child(model, name, PatchifyLinear(m))
        elif isinstance(m, nn.MultiheadAttention):
            rec.attention.append(name)
            _set_child(model, name, SelfAttention(m))
        elif isinstance(m, NORM_TYPES) and not keep_norm_affine:
            for pname, fill in (("weight", 1.0), ("bias", 0.0)):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter):
                    rec.removed_affine[f"{name}.{pname}" if name else pname] = (tuple(p.shape), fill)
                    # The affine stays as a constant: no parameter, nothing in the state dict.
                    # PyTorch's CPU norm kernels are 2-3x slower without an affine than with
                    # one (LayerNorm, ViT-S width: ~1% of an LTE step), and x·1 + 0 is x.
                    delattr(m, pname)
                    m.register_buffer(pname, torch.full(p.shape, fill, dtype=p.dtype,
                                                        device="cpu" if p.is_meta else p.device), persistent=False)
    return rec


def to_original_state(rec: PrepareRecord, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prepared model's state dict -> the original architecture's state dict."""
    out = dict(state)
    for prefix in rec.patchify:
        for kind in ("weight", "bias"):
            key = f"{prefix}.linear.{kind}"
            if key in out:
                t = out.pop(key)
                out[f"{prefix}.{kind}"] = t.reshape(rec.conv_shapes[prefix]) if kind == "weight" else t
    for prefix in rec.attention:
        for kind in ("weight", "bias"):
            key = f"{prefix}.in_proj.{kind}"
            if key in out:
                out[f"{prefix}.in_proj_{kind}"] = out.pop(key)
    for name, (shape, fill) in rec.removed_affine.items():
        out[name] = torch.full(shape, fill)
    return out
