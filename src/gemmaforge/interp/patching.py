"""Activation patching: the clean run's activation at one site put into the corrupted run."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..errors import InputError
from ..models.common.hooks import act_name, hooks
from .common import _as_ids, _layers

# ============================================================================ activation patching

# hooks whose TransformerLens layout has a head axis: [batch, pos, head, d_head] (or [b, h, q, k])
_HEAD_HOOKS = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
               "attn.hook_z", "attn.hook_result"}
_QK_HOOKS = {"attn.hook_attn_scores", "attn.hook_pattern"}  # [batch, head, query pos, key pos]


def _suffix(hook: str) -> str:
    full = act_name(hook, 0)
    return full.split(".", 2)[2]


@torch.no_grad()
def activation_patching(
    model,
    clean_ids,
    corrupted_ids,
    hook: str = "resid_post",
    metric: Callable[[torch.Tensor], float] | None = None,
    layers: Iterable[int] | None = None,
    positions: Iterable[int] | str | None = None,
    per_head: bool | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Patch ``hook``'s activation from the clean run into the corrupted run, one site at a time,
    and return ``metric(patched logits)`` for each site.

    ``hook``: a per-layer hook, short (``"resid_post"``, ``"z"``, ``"pattern"``...) or full
    (``"attn.hook_z"``). ``metric(logits) -> float`` gets logits shaped like the corrupted run's
    (``[batch, seq, vocab]``, or ``[seq, vocab]`` for 1-D ids). ``layers``: default all.
    ``positions``: default every position; ``"all"`` patches every position at once.
    ``per_head``: patch one head at a time (default for hooks with a head axis: q/k/v/rot_q/rot_k/
    z/result/attn_scores/pattern; for the latter two the position is the query position).

    Returns ``[n_layers, n_positions]``; ``[n_layers]`` when ``positions="all"``; a trailing
    ``[n_heads]`` (``n_kv_heads`` for k/v/rot_k) axis when ``per_head``: ``hook="z",
    positions="all"`` gives ``[n_layers, n_heads]``. Sites are run ``batch_size`` at a time as the
    rows of one batched forward. Clean and corrupted ids must have the same shape.
    """
    if metric is None:
        raise InputError("activation_patching needs metric=callable(logits) -> float")
    clean = _as_ids(model, clean_ids)
    corrupted = _as_ids(model, corrupted_ids)
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted ids must have the same shape; got {tuple(clean.shape)} "
                         f"and {tuple(corrupted.shape)}")
    lead = tuple(corrupted_ids.shape) if isinstance(corrupted_ids, torch.Tensor) else tuple(corrupted.shape)
    suffix = _suffix(hook)
    n_layers = len(_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for lay in layers:
        if not 0 <= lay < n_layers:
            raise InputError(f"layer {lay} out of range (0..{n_layers - 1})")
    B, S = corrupted.shape
    all_pos = isinstance(positions, str)
    if all_pos and positions != "all":
        raise InputError(f"positions must be a list of ints, None or 'all'; got {positions!r}")
    pos_list = [None] if all_pos else (list(range(S)) if positions is None else [int(p) % S for p in positions])
    has_heads = suffix in _HEAD_HOOKS or suffix in _QK_HOOKS
    per_head = has_heads if per_head is None else per_head
    if per_head and not has_heads:
        raise InputError(f"hook {hook!r} has no head axis; per_head patching needs q/k/v/z/result/pattern")
    head_axis, pos_axis = (1, 2) if suffix in _QK_HOOKS else (2, 1)

    names = [act_name(suffix, lay) for lay in layers]
    _, clean_cache = model.run_with_cache(clean, names_filter=names, include_opt_in=suffix == "attn.hook_result")
    n_heads = clean_cache[names[0]].shape[head_axis] if per_head else 1
    heads = list(range(n_heads)) if per_head else [None]
    sites = [(lay, p, h) for lay in layers for p in pos_list for h in heads]

    def select(t, rows, p, h):
        idx = [rows] + [slice(None)] * (t.dim() - 1)
        if p is not None:
            idx[pos_axis] = p
        if h is not None:
            idx[head_axis] = h
        return tuple(idx)

    results = []
    for start in range(0, len(sites), max(1, batch_size)):
        chunk = sites[start:start + max(1, batch_size)]
        n = len(chunk)
        by_layer: dict[int, list[tuple[int, int | None, int | None]]] = {}
        for j, (lay, p, h) in enumerate(chunk):
            by_layer.setdefault(lay, []).append((j, p, h))

        def patch(t, hook_ref, by_layer=by_layer):
            lay = hook_ref.layer()
            src = clean_cache[hook_ref.name]
            t = t.clone()
            for j, p, h in by_layer[lay]:
                rows = slice(j * B, (j + 1) * B)
                t[select(t, rows, p, h)] = src[select(src, slice(None), p, h)].to(t.dtype)
            return t

        fwd = [(act_name(suffix, lay), patch) for lay in by_layer]
        with hooks(model, fwd_hooks=fwd):
            logits = model(corrupted.repeat(n, 1))
        for j in range(n):
            results.append(float(metric(logits[j * B:(j + 1) * B].reshape(*lead, logits.shape[-1]))))
    shape = [len(layers)] + ([] if all_pos else [len(pos_list)]) + ([n_heads] if per_head else [])
    return torch.tensor(results, dtype=torch.float32).reshape(shape)
