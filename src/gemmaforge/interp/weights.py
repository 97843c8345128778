"""The model's weights in TransformerLens' conventions: ``W_E``, ``W_U``, per-head ``W_Q/W_K/W_V/W_O``,
``W_gate/W_in/W_out`` (weights act on the right, ``x @ W``; per-head weights ``[head, d_model, d_head]``).

Grouped-query attention as in TransformerLens' ``HookedTransformer``: ``W_K`` / ``W_V`` have one entry per
*query* head, the key/value heads repeated (query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``),
so ``W_Q[h]`` and ``W_K[h]`` pair up as in a multi-head model. The weights as stored, one entry per
key/value head, are ``W_K_kv`` / ``W_V_kv`` (``HookedTransformer`` calls them ``_W_K`` / ``_W_V``;
``TLWeights`` answers to both names). TransformerLens 4's ``TransformerBridge.W_K`` is the stored form.

Shapes are read per layer, from that layer's own modules: Gemma 4 layers differ (full-attention
layers have ``global_head_dim`` and, with ``attention_k_eq_v``, their own number of K/V heads; with
``use_double_wide_mlp`` the KV-sharing layers' MLP is twice as wide). Hence the rules:

- ``W_X(model, layer=i)`` is layer ``i``'s weight, always (``W_K``/``W_V`` with layer ``i``'s own ratio
  of query to key/value heads).
- ``W_X(model)`` stacks the layers into ``[n_layers, ...]`` when they all have the same shape and
  otherwise raises a one-line ``InputError`` (ask per layer): a list where a tensor is documented
  would fail later, further from the cause.
- ``TLWeights(model).W_X`` is the stacked tensor when the shapes agree and otherwise a ``PerLayer``
  list of the per-layer tensors; both index the same way (``w.W_Q[i]``, ``w.W_Q[i, h]``).
- A KV-sharing layer (Gemma 4 "reuse" layer: no ``k_proj``/``v_proj``) attends to the keys and values
  its source layer (``config.kv_source(i)``) computed, so its ``W_K``/``W_V`` are the source's.
- A K=V layer (Gemma 4 full layer with ``attention_k_eq_v``: no ``v_proj``) takes V from the raw
  ``k_proj`` output, so its ``W_V`` is its ``W_K`` (``W_V_kv`` is the very tensor ``W_K_kv`` is).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from ..errors import InputError
from ..models.common.blocks import applied_weight
from .common import _kv_source, _layer_index, _layers


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


def _heads_in(linear, d_head: int) -> torch.Tensor:
    """``[out = heads * d_head, d_model]`` -> ``[heads, d_model, d_head]`` (heads read off the weight
    itself, so a tensor-parallel shard gives its local heads)."""
    w = _w(linear)
    return w.view(-1, d_head, w.shape[1]).transpose(1, 2)


class PerLayer(list):
    """Per-layer tensors of differing shapes (a ``TLWeights`` attribute on a model whose layers
    differ). Indexes like the stacked tensor would: ``w.W_Q[i]`` is layer ``i``, ``w.W_Q[i, h]``
    is ``w.W_Q[i][h]``."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
            item = super().__getitem__(first)
            return item[rest] if rest else item
        return super().__getitem__(key)


def _all_layers(model, fn: Callable[[object, int], torch.Tensor]) -> list[torch.Tensor]:
    return [fn(model, i) for i in range(len(_layers(model)))]


def _shapes_differ(name: str, ts: list[torch.Tensor]) -> str | None:
    """None when every layer has the same shape, else a one-line description of the shapes."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(ts):
        groups[tuple(t.shape)].append(i)
    if len(groups) <= 1:
        return None
    parts = "; ".join(f"layer{'s' if len(ls) > 1 else ''} {','.join(map(str, ls))}: {list(s)}"
                      for s, ls in groups.items())
    return f"{name}: the layers have different shapes ({parts}); ask per layer: interp.{name}(model, layer=i)"


def _per_layer(model, layer: int | None, fn: Callable[[object, int], torch.Tensor], name: str) -> torch.Tensor:
    if layer is not None:
        return fn(model, _layer_index(model, layer))
    ts = _all_layers(model, fn)
    msg = _shapes_differ(name, ts)
    if msg is not None:
        raise InputError(msg)
    return torch.stack(ts)


# one layer each: (model, i) -> tensor; i is a valid non-negative index

def _q(model, i):
    attn = _layers(model)[i].self_attn
    return _heads_in(attn.q_proj, attn.head_dim)


def _k_kv(model, i):
    attn = _layers(model)[_kv_source(model, i)].self_attn
    return _heads_in(attn.k_proj, attn.head_dim)


def _v_kv(model, i):
    attn = _layers(model)[_kv_source(model, i)].self_attn
    v_proj = getattr(attn, "v_proj", None)
    return _heads_in(attn.k_proj if v_proj is None else v_proj, attn.head_dim)  # K=V: V is the raw k_proj output


def _to_query_heads(model, i, kv: torch.Tensor) -> torch.Tensor:
    """``[n_kv_heads, d_model, d_head]`` -> ``[n_heads, d_model, d_head]``: query head ``h`` of layer ``i``
    reads kv head ``h // (n_heads // n_kv_heads)`` (TransformerLens' ``repeat_interleave``). Unchanged (the
    view) when every head has its own keys; otherwise a new tensor."""
    attn = _layers(model)[i].self_attn
    n_heads = attn.q_proj.weight.shape[0] // attn.head_dim  # read off the weight, as the kv form's count is
    n_kv = kv.shape[0]
    if n_heads == n_kv:
        return kv
    if n_heads % n_kv:
        raise InputError(f"layer {i}: {n_heads} query heads do not share {n_kv} key/value heads evenly")
    return kv.repeat_interleave(n_heads // n_kv, dim=0)


def _k(model, i):
    return _to_query_heads(model, i, _k_kv(model, i))


def _v(model, i):
    return _to_query_heads(model, i, _v_kv(model, i))


def _o(model, i):
    attn = _layers(model)[i].self_attn
    w = _w(attn.o_proj)  # [d_model, heads * d_head]
    return w.view(w.shape[0], -1, attn.head_dim).permute(1, 2, 0)


def _gate(model, i):
    return _w(_layers(model)[i].mlp.gate_proj).T


def _in(model, i):
    return _w(_layers(model)[i].mlp.up_proj).T


def _out(model, i):
    return _w(_layers(model)[i].mlp.down_proj).T


def W_Q(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_model, d_head]`` (``[n_heads, d_model, d_head]`` for one ``layer``):
    ``hook_q = q_norm(ln1 @ W_Q)`` per head (Gemma's q_norm comes before RoPE; see ``hook_rot_q``).
    Gemma 4's full-attention layers have a larger ``d_head``: ask those per layer."""
    return _per_layer(model, layer, _q, "W_Q")


def W_K(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_model, d_head]``, TransformerLens' shape: the key/value heads repeated to the
    query heads (grouped-query: query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``), so
    ``hook_k[..., h // g, :] = k_norm(ln1 @ W_K[h])`` (Gemma; Mistral has no k_norm). A new tensor under
    grouped-query attention (``W_K_kv`` is the stored weight, a view).

    A KV-sharing layer (no ``k_proj``) gives its source layer's keys, applied to the *source
    layer's* ``ln1``: those are the keys it attends to. Gemma 4's full layers may have another
    ``d_head``: ask those per layer."""
    return _per_layer(model, layer, _k, "W_K")


def W_V(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_model, d_head]``, repeated to the query heads as ``W_K``: ``hook_v`` of kv
    head ``h // g`` is ``ln1 @ W_V[h]`` (Gemma 3, Mistral: no norm on V; Gemma 4: ``v_norm(ln1 @ W_V[h])``,
    a norm without weight), and ``hook_z[..., h, :] = pattern[:, h] @ (that)``.

    A K=V layer (no ``v_proj``) gives its ``W_K``: its V is the raw ``k_proj`` output. A KV-sharing
    layer gives its source layer's (as for ``W_K``)."""
    return _per_layer(model, layer, _v, "W_V")


def W_K_kv(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_kv_heads, d_model, d_head]``: the key weight as stored, one entry per key/value
    head (``HookedTransformer``'s ``_W_K``; TransformerLens 4's ``TransformerBridge.W_K``):
    ``hook_k = k_norm(ln1 @ W_K_kv)``. Same layer rules as ``W_K``; one layer's is a view of ``k_proj``."""
    return _per_layer(model, layer, _k_kv, "W_K_kv")


def W_V_kv(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_kv_heads, d_model, d_head]``: the value weight as stored (``HookedTransformer``'s
    ``_W_V``): ``hook_v = ln1 @ W_V_kv`` (Gemma 4: then ``v_norm``). On a K=V layer the very tensor
    ``W_K_kv`` gives."""
    return _per_layer(model, layer, _v_kv, "W_V_kv")


def W_O(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, n_heads, d_head, d_model]``: ``o_proj(z) = sum_h z[..., h, :] @ W_O[h]`` (Gemma:
    ``hook_attn_out`` is that after the post-attention norm)."""
    return _per_layer(model, layer, _o, "W_O")


def W_gate(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_model, d_mlp]``: ``mlp.hook_pre = ln2 @ W_gate`` (goes through the activation).
    The dense MLP only (not Gemma 4's MoE experts); Gemma 4 with ``use_double_wide_mlp`` has a wider
    ``d_mlp`` on its KV-sharing layers: ask those per layer."""
    return _per_layer(model, layer, _gate, "W_gate")


def W_in(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_model, d_mlp]``: ``mlp.hook_pre_linear = ln2 @ W_in`` (the linear branch)."""
    return _per_layer(model, layer, _in, "W_in")


def W_out(model, layer: int | None = None) -> torch.Tensor:
    """``[n_layers, d_mlp, d_model]``: the dense MLP's output is ``mlp.hook_post @ W_out`` (before any
    post-norm: ``hook_mlp_out`` for Mistral; Gemma normalises it first, Gemma 4 MoE layers add the experts)."""
    return _per_layer(model, layer, _out, "W_out")


class TLWeights:
    """The weights above as attributes: ``w = TLWeights(model); w.W_Q[3, 0]``.

    ``W_E`` / ``W_U`` and single-layer calls are detached *views* of the parameters (no copy:
    writing into them writes into the model; ``.clone()`` for a private copy), except the weight
    of a projection carrying an unmerged LoRA adapter, which is the weight it applies,
    ``W + scaling * B @ A``, a new tensor (``merge`` the adapters first for views), and ``W_K`` /
    ``W_V`` under grouped-query attention (the kv heads repeated; ``W_K_kv`` / ``W_V_kv`` are the views).

    The per-layer attributes (``W_Q`` .. ``W_out``) are built on first access and cached (build a new
    ``TLWeights`` after changing the model's weights): a stacked ``[n_layers, ...]`` detached copy
    when every layer has the same shape, else (Gemma 4) a ``PerLayer`` list of the per-layer
    tensors, as ``W_X(model, layer=i)`` gives them (views), indexed the same way (``w.W_Q[i]``,
    ``w.W_Q[i, h]``). The KV-sharing and K=V rules are the functions' (module docstring).
    ``w._W_K`` / ``w._W_V`` (``HookedTransformer``'s names) are ``w.W_K_kv`` / ``w.W_V_kv``.
    """

    _PER_LAYER = {"W_Q": _q, "W_K": _k, "W_V": _v, "W_O": _o, "W_gate": _gate, "W_in": _in, "W_out": _out,
                  "W_K_kv": _k_kv, "W_V_kv": _v_kv}
    _ALIASES = {"_W_K": "W_K_kv", "_W_V": "W_V_kv"}

    def __init__(self, model):
        self.model = model
        self._cache: dict[str, torch.Tensor | PerLayer] = {}

    @property
    def W_E(self) -> torch.Tensor:
        return W_E(self.model)

    @property
    def W_U(self) -> torch.Tensor:
        return W_U(self.model)

    def __getattr__(self, name):
        name = TLWeights._ALIASES.get(name, name)
        fn = TLWeights._PER_LAYER.get(name)
        if fn is None:
            raise AttributeError(name)
        cache = self.__dict__["_cache"]
        if name not in cache:
            ts = _all_layers(self.__dict__["model"], fn)
            cache[name] = PerLayer(ts) if _shapes_differ(name, ts) else torch.stack(ts)
        return cache[name]
