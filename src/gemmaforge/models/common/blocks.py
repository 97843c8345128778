"""Pieces of a decoder layer that several families share, with their TransformerLens hook sites."""

from __future__ import annotations

import torch
from torch import nn

from ...layers.attention import AttnCall, attention
from ...layers.rope import apply_rope
from .context import ForwardContext


def applied_weight(linear: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight a Linear-like module applies: ``effective_weight()`` where the module
    defines one (a LoRA wrapper: its adapter folded in), else its ``weight``."""
    fn = getattr(linear, "effective_weight", None)
    return fn() if fn is not None else linear.weight


def attend(q, k, v, ctx: ForwardContext, call: AttnCall, layer_idx: int) -> torch.Tensor:
    """Attention of one layer call: the context's backend, or the eager reference when a hook reads
    this layer's scores or pattern (for this call only)."""
    if layer_idx in ctx.eager_layers:
        call.tap = lambda name, t: ctx.hook(layer_idx, name, t, "bhqk")
        return attention(q, k, v, call, "eager")[0]
    return attention(q, k, v, call, ctx.backend)[0]


def rope_cache_attend(q, k, v, ctx: ForwardContext, *, layer_idx: int, layer_type: str, window, scale: float,
                      softcap=None, bidirectional_groups: bool = False) -> torch.Tensor:
    """The part of self-attention every family shares, after projections (and q/k norms):
    apply this layer type's RoPE, append to the key source if any, attend under the composed mask
    (``bidirectional_groups``: the tokens of one image, ``ctx.info.groups``, see each other).
    q [B,H,S,D], k/v [B,Hkv,S,D] -> [B,H,S,D]."""
    i = layer_idx
    q, k, v = (ctx.hook(i, n, t, "bhsd") for n, t in (("attn.hook_q", q), ("attn.hook_k", k), ("attn.hook_v", v)))
    cos, sin = ctx.rope[layer_type]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = ctx.hook(i, "attn.hook_rot_q", q, "bhsd"), ctx.hook(i, "attn.hook_rot_k", k, "bhsd")
    info = ctx.info
    k_doc, k_idx = info.doc, info.idx
    if ctx.cache is not None:
        k, v, k_doc, k_idx = ctx.cache.update(layer_idx, k, v, info.doc, info.idx)
    # the keys are exactly this call's tokens: no key source, or one that returned them as they came
    own = ctx.cache is None or (k_idx is info.idx and k_doc is info.doc)
    call = AttnCall(info, k_doc, k_idx, window, scale, softcap, own, bidirectional_groups=bidirectional_groups)
    return attend(q, k, v, ctx, call, i)


def attn_output(o_proj: nn.Module, out: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    """Per-head attention output ``z`` -> ``o_proj``. out: [B,H,S,D] -> [B,S,hidden]."""
    B, H, S, D = out.shape
    z = ctx.hook(layer_idx, "attn.hook_z", out.transpose(1, 2), "bshd")  # (B, S, H, D)
    if ctx.wants(layer_idx, "attn.hook_result"):
        # opt-in: each head's contribution through its slice of W_O, (B, S, H, hidden); they sum to o_proj(z).
        # W_O is the weight o_proj applies: an unmerged LoRA adapter folded in (its dropout is not applied)
        w = applied_weight(o_proj)
        w = w.view(w.shape[0], H, D)
        result = ctx.hook(layer_idx, "attn.hook_result", torch.einsum("bshd,mhd->bshm", z, w), "bshd")
        bias = getattr(o_proj, "bias", None)
        return result.sum(2) if bias is None else result.sum(2) + bias
    return o_proj(z.reshape(B, S, -1))


def sandwich_attention(layer: nn.Module, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The attention half of a sandwich-norm decoder layer (Gemma 3 and 4), with its TransformerLens
    hook sites: ``h + post_norm(attn(input_norm(h)))``, the residual at ``hook_resid_mid``. As in
    TransformerLens, ``hook_attn_out`` is what reaches the residual (after the post-norm)."""
    i, hk = layer.layer_idx, ctx.hook
    h = hk(i, "hook_resid_pre", h)
    a = layer.self_attn(hk(i, "ln1.hook_normalized", layer.input_layernorm(hk(i, "hook_attn_in", h))), ctx)
    a = hk(i, "hook_attn_out", hk(i, "ln1_post.hook_normalized", layer.post_attention_layernorm(a)))
    return hk(i, "hook_resid_mid", h + a)


def sandwich_mlp(layer: nn.Module, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The dense MLP of a sandwich-norm layer on the pre-MLP norm of ``h`` (before its post-norm)."""
    i = layer.layer_idx
    return layer.mlp(ctx.hook(i, "ln2.hook_normalized", layer.pre_feedforward_layernorm(h)), ctx.mlp_hook(i))


def sandwich_mlp_out(layer: nn.Module, m: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The MLP output's post-norm: what the residual receives (``hook_mlp_out``)."""
    i, hk = layer.layer_idx, ctx.hook
    return hk(i, "hook_mlp_out", hk(i, "ln2_post.hook_normalized", layer.post_feedforward_layernorm(m)))
