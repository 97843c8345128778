"""What the interpretability tools read of a model's structure."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def _layers(model) -> list[nn.Module]:
    return list(model.model.layers.values())


def _sandwich(layer: nn.Module) -> bool:
    """Gemma-style block: norms after attention and MLP outputs, before the residual add."""
    return hasattr(layer, "post_feedforward_layernorm")


def _pre_mlp_norm(layer: nn.Module) -> nn.Module:
    # Gemma: pre_feedforward_layernorm; Llama/Mistral name their pre-MLP norm post_attention_layernorm
    return layer.pre_feedforward_layernorm if _sandwich(layer) else layer.post_attention_layernorm


def _dims(model) -> tuple[int, int, int, int]:
    """(n_heads, n_kv_heads, d_head, d_model) read from the weights (robust to sharded projections)."""
    attn = _layers(model)[0].self_attn
    d = attn.head_dim
    return attn.q_proj.weight.shape[0] // d, attn.k_proj.weight.shape[0] // d, d, attn.q_proj.weight.shape[1]


def _as_ids(model, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise InputError(f"expected token ids of shape [seq] or [batch, seq]; got {tuple(ids.shape)}")
    return ids.to(model.device)
