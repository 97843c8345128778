"""Encoder features as prefixes: a projector into the decoder's embedding space, placeholder helpers.

The scaling rule (see ``CausalLM.forward``): text tokens are embedded by the model, which scales
them by sqrt(hidden) exactly once; spliced features are used as given. The projector therefore
outputs vectors at the scale of *scaled* token embeddings: its last layer learns that scale (it is
initialised to the typical norm of scaled embeddings so training starts in range).

Image masks: ``model(..., mm_groups=group_ids_from_token_types(token_types))`` lets the tokens of
one image attend to each other bidirectionally (Gemma 3: every layer; Gemma 4: sliding layers),
within their document; text stays causal.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.norm import RMSNorm


class Projector(nn.Module):
    """``[B, N, d_encoder]`` -> ``[B, N, hidden]``: RMSNorm, then linear or a 2-layer GELU MLP."""

    def __init__(self, d_encoder: int, hidden: int, kind: str = "mlp", d_mid: int | None = None,
                 out_scale: float = 1.0):
        super().__init__()
        self.norm = RMSNorm(d_encoder)
        if kind == "linear":
            self.net = nn.Linear(d_encoder, hidden)
        elif kind == "mlp":
            d_mid = d_mid or hidden
            self.net = nn.Sequential(nn.Linear(d_encoder, d_mid), nn.GELU(approximate="tanh"), nn.Linear(d_mid, hidden))
        else:
            raise ValueError(f"projector kind must be 'linear' or 'mlp' (got {kind!r})")
        self.out_scale = nn.Parameter(torch.tensor(float(out_scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(feats)) * self.out_scale


def embedding_scale_of(model) -> float:
    """RMS of the model's scaled token embeddings: what spliced features should look like."""
    with torch.no_grad():
        w = model.model.embed_tokens.weight
        ids = torch.arange(0, w.shape[0], max(1, w.shape[0] // 4096), device=w.device)
        e = model.embed(ids[None])[0].float()
        return float(e.pow(2).mean().sqrt())


def placeholder_positions(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Positions ``[B, N]`` of a placeholder token (same count in every row)."""
    mask = input_ids == token_id
    counts = mask.sum(-1)
    if input_ids.dim() == 2 and len(set(counts.tolist())) > 1:
        raise ValueError(f"rows hold different numbers of placeholder {token_id}: {counts.tolist()}")
    idx = mask.nonzero()
    return idx[:, -1].reshape(*input_ids.shape[:-1], -1)


def group_ids_from_token_types(token_types: torch.Tensor, vision_types: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Group ids for ``mm_groups`` from the reference's token types, as transformers derives them.

    Every maximal run of vision tokens (a type in ``vision_types``) along the last dim is one
    group, numbered 0, 1, ... per row; every other token gets -1. Gemma 3's ``token_type_ids``
    mark images with 1; Gemma 4's ``mm_token_type_ids`` mark images 1 and video 2 (audio, 3, stays
    causal). For a packed row, call it per document or on the whole row: ids may repeat across
    documents, the document mask keeps them apart.
    """
    is_vision = torch.zeros_like(token_types, dtype=torch.bool)
    for t in vision_types:
        is_vision |= token_types == t
    prev = torch.nn.functional.pad(is_vision, (1, 0), value=False)[..., :-1]
    starts = is_vision & ~prev
    ids = torch.cumsum(starts.long(), dim=-1) - 1
    return torch.where(is_vision, ids, -1)
