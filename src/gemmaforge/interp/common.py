"""What the interpretability tools read of a model's structure."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def _layers(model) -> list[nn.Module]:
    return list(model.model.layers.values())


def _layer_index(model, layer: int) -> int:
    """``layer`` as a non-negative index (negative counts from the end), or a one-line InputError."""
    n = len(_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
        raise InputError(f"layer {layer!r} is out of range for a model of {n} layers")
    return layer % n


def _sandwich(layer: nn.Module) -> bool:
    """Gemma-style block: norms after attention and MLP outputs, before the residual add."""
    return hasattr(layer, "post_feedforward_layernorm")


def _pre_mlp_norm(layer: nn.Module) -> nn.Module:
    # Gemma: pre_feedforward_layernorm; Llama/Mistral name their pre-MLP norm post_attention_layernorm
    return layer.pre_feedforward_layernorm if _sandwich(layer) else layer.post_attention_layernorm


def _owns_kv(attn: nn.Module) -> bool:
    """Whether an attention module computes its own keys/values (a Gemma 4 KV-sharing "reuse"
    layer owns no ``k_proj``: it attends to the keys/values of an earlier layer)."""
    return getattr(attn, "k_proj", None) is not None


def _kv_source(model, i: int) -> int:
    """The layer whose ``k_proj`` (and ``v_proj``) computed the keys/values layer ``i`` attends to:
    ``i`` itself, or for a KV-sharing layer its source, ``config.kv_source(i)``."""
    if _owns_kv(_layers(model)[i].self_attn):
        return i
    source = getattr(model.config, "kv_source", None)
    if source is None:
        raise InputError(f"layer {i} has no k_proj and the config does not say which layer's keys it reads")
    return source(i)


def _as_ids(model, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise InputError(f"expected token ids of shape [seq] or [batch, seq]; got {tuple(ids.shape)}")
    return ids.to(model.device)
