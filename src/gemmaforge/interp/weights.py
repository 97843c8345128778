"""The model's weights in TransformerLens' conventions: ``W_E``, ``W_U``, per-head ``W_Q/W_K/W_V/W_O``,
``W_gate/W_in/W_out`` (weights act on the right, ``x @ W``; per-head weights ``[head, d_model, d_head]``)."""

from __future__ import annotations

import torch

from ..models.common.blocks import applied_weight
from .common import _dims, _layers

def W_E(model) -> torch.Tensor:
    """Token embedding ``[vocab, d_model]`` as stored (Gemma multiplies it by ``sqrt(d_model)`` in
    ``hook_embed``: ``cache["embed"] == W_E[ids] * model.model.embed_tokens.scale`` cast to the dtype)."""
    return model.model.embed_tokens.weight.detach()


def W_U(model) -> torch.Tensor:
    """Unembedding ``[d_model, vocab]``: ``logits = ln_final @ W_U`` (then the final softcap, if any)."""
    return model.lm_head.matrix().detach().T


def _w(linear) -> torch.Tensor:
    """The weight a projection applies, detached: ``W`` itself (a view), or ``W + scaling * B @ A``
    (a new tensor) for a projection carrying an unmerged LoRA adapter."""
    return applied_weight(linear).detach()


def _per_layer(model, layer, fn) -> torch.Tensor:
    if layer is not None:
        return fn(_layers(model)[layer])
    return torch.stack([fn(lay) for lay in _layers(model)])


def W_Q(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_model, d_head]`` (``[n_heads, d_model, d_head]`` for one ``layer``):
    ``hook_q = q_norm(ln1 @ W_Q)`` per head (Gemma's q_norm comes before RoPE; see ``hook_rot_q``)."""
    H, _, D, d = _dims(model)
    return _per_layer(model, layer, lambda L: _w(L.self_attn.q_proj).view(H, D, d).transpose(1, 2))


def W_K(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_kv_heads, d_model, d_head]`` (grouped-query: query head ``h`` reads kv head
    ``h // (n_heads // n_kv_heads)``)."""
    _, Hkv, D, d = _dims(model)
    return _per_layer(model, layer, lambda L: _w(L.self_attn.k_proj).view(Hkv, D, d).transpose(1, 2))


def W_V(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_kv_heads, d_model, d_head]``: ``hook_v = ln1 @ W_V`` (no norm on V)."""
    _, Hkv, D, d = _dims(model)
    return _per_layer(model, layer, lambda L: _w(L.self_attn.v_proj).view(Hkv, D, d).transpose(1, 2))


def W_O(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_head, d_model]``: ``hook_attn_out = sum_h z[..., h, :] @ W_O[h]``."""
    H, _, D, d = _dims(model)
    return _per_layer(model, layer, lambda L: _w(L.self_attn.o_proj).view(d, H, D).permute(1, 2, 0))


def W_gate(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_model, d_mlp]``: ``mlp.hook_pre = ln2 @ W_gate`` (goes through the activation)."""
    return _per_layer(model, layer, lambda L: _w(L.mlp.gate_proj).T)


def W_in(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_model, d_mlp]``: ``mlp.hook_pre_linear = ln2 @ W_in`` (the linear branch)."""
    return _per_layer(model, layer, lambda L: _w(L.mlp.up_proj).T)


def W_out(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_mlp, d_model]``: ``hook_mlp_out = mlp.hook_post @ W_out``."""
    return _per_layer(model, layer, lambda L: _w(L.mlp.down_proj).T)


class TLWeights:
    """The weights above as attributes: ``w = TLWeights(model); w.W_Q[3, 0]``.

    ``W_E`` / ``W_U`` and single-layer calls are detached *views* of the parameters (no copy:
    writing into them writes into the model; ``.clone()`` for a private copy), except the weight
    of a projection carrying an unmerged LoRA adapter, which is the weight it applies,
    ``W + scaling * B @ A``, a new tensor (``merge`` the adapters first for views). The stacked
    ``[n_layers, ...]`` attributes are detached copies, built on first access and cached;
    build a new ``TLWeights`` after changing the model's weights.
    """

    _STACKED = {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O, "W_gate": W_gate, "W_in": W_in, "W_out": W_out}

    def __init__(self, model):
        self.model = model
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def W_E(self) -> torch.Tensor:
        return W_E(self.model)

    @property
    def W_U(self) -> torch.Tensor:
        return W_U(self.model)

    def __getattr__(self, name):
        fn = TLWeights._STACKED.get(name)
        if fn is None:
            raise AttributeError(name)
        cache = self.__dict__["_cache"]
        if name not in cache:
            cache[name] = fn(self.__dict__["model"])
        return cache[name]
