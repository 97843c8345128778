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
        norm.weight.zero_()  # Gemma 3 stores the scale as 1 + w
    elif isinstance(norm, RMSNorm):
        if norm.weight is not None:
            norm.weight.fill_(1.0)
    else:
        raise InputError(f"fold_norm_weights: unsupported norm {type(norm).__name__}")


def _scale_columns(w: torch.Tensor, scale: torch.Tensor) -> None:
    """``w[..., j] *= scale[j]`` in place: scales each input column, in fp32."""
    w.copy_((w.float() * scale.to(w.device)).to(w.dtype))


def _linear_weight(lin: nn.Module, where: str) -> torch.Tensor:
    """The weight whose input columns to scale: a Linear's (a subclass too: the LM head is one). A
    module that applies more than its ``weight`` (a LoRA wrapper, whose ``effective_weight()`` adds
    ``B @ A``) is refused: scaling only ``weight`` would leave the adapter reading the unscaled input."""
    if hasattr(lin, "effective_weight") or hasattr(lin, "lora_A"):
        raise InputError(f"fold_norm_weights: {where} is a {type(lin).__name__} carrying an adapter "
                         "(merge LoRA adapters first)")
    if not isinstance(lin, nn.Linear):
        raise InputError(f"fold_norm_weights: {where} is a {type(lin).__name__}, not a Linear")
    return lin.weight  # a bias reads no input: unchanged


def _experts_weight(experts: nn.Module, where: str) -> torch.Tensor:
    """The experts' packed ``gate_up_proj`` ``[E, 2I, d_model]``: each expert computes
    ``x @ gate_up_proj[e].T``, so scaling its last dim is the same column scaling as for a Linear."""
    w = getattr(experts, "gate_up_proj", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or type(w.data) is not torch.Tensor:
        raise InputError(f"fold_norm_weights: {where} holds no plain packed gate_up_proj "
                         "[experts, 2 * d_expert, d_model] to fold its input norm into")
    return w


def _plan(model) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """(norm, the weights reading its output) for every foldable norm of the layers, checked before
    anything is written (a refusal leaves the model as it was). A norm without weight has nothing to
    fold and is left out."""
    plan = []
    for i, layer in enumerate(_layers(model)):
        attn = layer.self_attn
        # k_proj/v_proj are absent on KV-sharing layers, v_proj on K=V layers
        names = [n for n in ("q_proj", "k_proj", "v_proj") if getattr(attn, n, None) is not None]
        plan.append((layer.input_layernorm, [_linear_weight(getattr(attn, n), f"layer {i} self_attn.{n}")
                                             for n in names]))
        plan.append((_pre_mlp_norm(layer), [_linear_weight(getattr(layer.mlp, n), f"layer {i} mlp.{n}")
                                            for n in ("gate_proj", "up_proj")]))
        if getattr(layer, "moe", False) is True:
            plan.append((layer.pre_feedforward_layernorm_2, [_experts_weight(layer.experts, f"layer {i} experts")]))
    for norm, _ in plan + [(model.model.norm, [])]:
        if not isinstance(norm, (GemmaRMSNorm, RMSNorm)):
            raise InputError(f"fold_norm_weights: unsupported norm {type(norm).__name__}")
    return [(norm, ws) for norm, ws in plan if norm.weight is not None]


@torch.no_grad()
def fold_norm_weights(model):
    """Fold each norm's scale into the weights that read its output; set those norms to identity.

    Opt-in, in place, returns ``model``. A norm is ``rms(x) * s`` (Gemma 3: ``s = 1 + w``; Gemma 4
    and Mistral: ``s = w``) so ``W @ norm(x) == (W * s) @ rms(x)``: after folding,

    - ``input_layernorm`` -> the input columns of ``q_proj``, ``k_proj``, ``v_proj``, those the layer
      has. A Gemma 4 KV-sharing layer owns only ``q_proj`` (its keys/values were computed by its
      source layer from the *source's* ``input_layernorm``, folded into the source's ``k_proj``);
      a K=V layer owns no ``v_proj`` (V is the raw ``k_proj`` output, already folded);
    - ``pre_feedforward_layernorm`` (Mistral: ``post_attention_layernorm``, its pre-MLP norm)
      -> ``gate_proj`` and ``up_proj``;
    - Gemma 4 MoE layers: ``pre_feedforward_layernorm_2`` -> the experts' input columns
      (``experts.gate_up_proj[e, :, j]``, every expert reads the same normed input);
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
      (Gemma 4's ``v_norm`` has no weight: nothing to fold.)
    - ``post_attention_layernorm`` / ``post_feedforward_layernorm`` (the sandwich norms), and Gemma
      4's ``post_feedforward_layernorm_1/_2`` and ``post_per_layer_input_norm``: their output is added
      to something else (the residual stream, or the dense and expert outputs to each other). Their
      scale applies after a normalisation of the block's *own* output, so it cannot move into the
      projection before them (the rms is taken after it) nor into the readers of the sum.
    - Gemma 4's MoE router reads the residual stream itself (its own norm has no weight), and the
      per-layer-input gate reads the residual too: no layer norm to fold. The router's learned
      ``scale`` stays as well: routing is a top-k, and moving rounding points could flip a near tie.
    - Gemma 4's ``per_layer_projection_norm`` (per-layer inputs): its output is added to the
      per-layer token embeddings before anything reads it.
    """
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise InputError(f"fold_norm_weights: lm_head is a {type(head).__name__}, not a plain bias-free head")
    tied = head.weight is model.model.embed_tokens.weight
    if not tied:
        _linear_weight(head, "lm_head")
    for norm, weights in _plan(model):
        s = norm.scale().clone()  # fp32 scale() may be the weight itself, which becomes identity below
        for w in weights:
            _scale_columns(w, s)
        _set_identity(norm)
    norm = model.model.norm
    s = norm.scale().clone()
    if tied:
        w = head.weight
        head.weight = nn.Parameter((w.detach().float() * s.to(w.device)).to(w.dtype), requires_grad=w.requires_grad)
        if getattr(model.config, "tie_word_embeddings", False):
            try:
                model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
            except TypeError:  # not a dataclass: edit in place
                model.config.tie_word_embeddings = False
    else:
        _scale_columns(head.weight, s)
    _set_identity(norm)
    return model

