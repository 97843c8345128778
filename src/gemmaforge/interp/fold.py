"""Folding each norm's scale into the weights that read its output (TransformerLens' ``fold_ln``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import InputError
from ..layers.norm import GemmaRMSNorm, RMSNorm
from .common import _layers, _pre_mlp_norm

def _set_identity(norm: nn.Module) -> None:
    if isinstance(norm, GemmaRMSNorm):
        norm.weight.zero_()  # Gemma stores the scale as 1 + w
    elif isinstance(norm, RMSNorm):
        if norm.weight is not None:
            norm.weight.fill_(1.0)
    else:
        raise InputError(f"fold_norm_weights: unsupported norm {type(norm).__name__}")


def _scale_inputs(lin: nn.Module, scale: torch.Tensor, where: str) -> None:
    if type(lin) is not nn.Linear:
        raise InputError(f"fold_norm_weights: {where} is a {type(lin).__name__}, not a plain Linear "
                         "(merge LoRA adapters first)")
    w = lin.weight
    w.copy_((w.float() * scale.to(w.device)).to(w.dtype))  # scale each input column, in fp32


@torch.no_grad()
def fold_norm_weights(model):
    """Fold each norm's scale into the weights that read its output; set those norms to identity.

    Opt-in, in place, returns ``model``. For Gemma ``norm(x) = rms(x) * (1 + w)`` so
    ``W @ norm(x) == (W * (1 + w)) @ rms(x)``: after folding,

    - ``input_layernorm`` -> the input columns of ``q_proj``, ``k_proj``, ``v_proj``;
    - ``pre_feedforward_layernorm`` (Mistral: ``post_attention_layernorm``, its pre-MLP norm)
      -> ``gate_proj`` and ``up_proj``;
    - the final ``norm`` -> the LM head. A tied head is untied first (a new ``lm_head.weight`` =
      embedding * scale; the embedding itself is unchanged) and ``config.tie_word_embeddings``
      becomes False, so ``save_hf`` writes the head.

    Logits are unchanged up to fp32 rounding (exact in exact arithmetic; in bf16 the rounding
    points move, so fold in fp32). ``ln1.hook_normalized`` / ``ln2.hook_normalized`` /
    ``ln_final.hook_normalized`` then show the unscaled ``rms(x)``, as in TransformerLens' ``fold_ln``.

    Norms that stay, and why:

    - ``q_norm`` / ``k_norm``: they act per head after the projection and before RoPE. RoPE mixes
      dimension ``i`` with ``i + d_head/2``, so a per-dimension scale does not commute with it
      unless both halves share the scale; there is no weight before the dot product to absorb it.
    - ``post_attention_layernorm`` / ``post_feedforward_layernorm`` (Gemma's sandwich norms):
      their output is added straight into the residual stream. Their scale applies after a
      normalisation of the block's *own* output, so it cannot move into ``o_proj`` / ``down_proj``
      (the rms is taken after them) nor into the readers of the residual (which read a sum).
    """
    for i, layer in enumerate(_layers(model)):
        s = layer.input_layernorm.scale()
        for n in ("q_proj", "k_proj", "v_proj"):
            _scale_inputs(getattr(layer.self_attn, n), s, f"layer {i} self_attn.{n}")
        _set_identity(layer.input_layernorm)
        pre = _pre_mlp_norm(layer)
        s = pre.scale()
        for n in ("gate_proj", "up_proj"):
            _scale_inputs(getattr(layer.mlp, n), s, f"layer {i} mlp.{n}")
        _set_identity(pre)
    norm = model.model.norm
    s = norm.scale()
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise InputError(f"fold_norm_weights: lm_head is a {type(head).__name__}, not a plain bias-free head")
    if head.weight is model.model.embed_tokens.weight:
        w = head.weight
        head.weight = nn.Parameter((w.detach().float() * s.to(w.device)).to(w.dtype), requires_grad=w.requires_grad)
        if getattr(model.config, "tie_word_embeddings", False):
            try:
                model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
            except TypeError:  # not a dataclass: edit in place
                model.config.tie_word_embeddings = False
    else:
        _scale_inputs(head, s, "lm_head")
    _set_identity(norm)
    return model
