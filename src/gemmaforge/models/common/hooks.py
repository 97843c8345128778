"""Hook points with TransformerLens names, an activation cache, and hooks that replace activations.

The model files carry named hook *sites* (``ctx.hook(layer, name, x)``) that cost one function call
when nothing is attached. This module decides what runs there: caching, replacement, ablation.
Shapes follow TransformerLens: ``[batch, pos, d_model]`` for the residual stream,
``[batch, pos, head, d_head]`` for q/k/v/z (``hook_q``/``hook_k`` are after the per-head q/k norm,
before RoPE; ``hook_rot_q``/``hook_rot_k`` after that layer's own RoPE), ``[batch, head, q, k]`` for
``attn.hook_attn_scores`` / ``attn.hook_pattern``. Asking for scores or the pattern of a layer runs
that layer on the eager backend for that call only.

Against TransformerLens 4's Gemma 3 bridge (unprocessed: nothing folded or centred; tests/test_hooks.py
compares every point) the values are its own, k/v with the key/value heads not repeated as there, except:
``attn.hook_q``/``hook_k`` are its ``hook_q_normed``/``hook_k_normed`` (its ``hook_q``/``hook_k`` are the raw
projection, before the q/k norm; its normed ones are ``[batch, head, pos, d_head]``); ``lnX.hook_normalized``
(and ``ln_final``) is the norm's output, ``rms(x) * (1 + w)``, its ``lnX.hook_out`` (its
``hook_normalized`` is ``rms(x)`` before the weight: ours too after ``interp.fold_norm_weights``); masked
scores are ``-inf`` (its: ``finfo.min``); ``hook_attn_in`` is the residual its ``ln1.hook_in`` reads.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

# per-layer hook names in execution order (families without sandwich norms skip the *_post norms)
LAYER_HOOKS = [
    "hook_resid_pre", "hook_attn_in", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
    "ln1_post.hook_normalized", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "ln2_post.hook_normalized", "hook_mlp_out",
    "hook_resid_post",
]
SANDWICH_ONLY = {"ln1_post.hook_normalized", "ln2_post.hook_normalized"}
OPT_IN = {"attn.hook_result"}  # computed only when asked for by name (costs a per-head projection)
EAGER = {"attn.hook_attn_scores", "attn.hook_pattern"}

# TransformerLens get_act_name shorthands: cache["resid_post", 3]
SHORT = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_in": "hook_attn_in", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "z": "attn.hook_z", "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern",
    "attn": "attn.hook_pattern", "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
    "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post",
    "ln1": "ln1.hook_normalized", "ln2": "ln2.hook_normalized", "ln1_post": "ln1_post.hook_normalized",
    "ln2_post": "ln2_post.hook_normalized",
}
GLOBAL_SHORT = {"embed": "hook_embed", "ln_final": "ln_final.hook_normalized", "logits": "hook_logits"}


def act_name(name: str, layer: int | None = None) -> str:
    if layer is None:
        return GLOBAL_SHORT.get(name, name)
    return f"blocks.{layer}.{SHORT.get(name, name)}"


def hook_names(model, include_opt_in: bool = False) -> list[str]:
    """Every hook point of ``model`` in execution order.

    A decoder layer may declare ``absent_hook_points`` (names it never reaches, e.g. the k/v hooks
    of a Gemma 4 KV-sharing layer, which computes no keys): those are not hook points, so asking
    for one fails instead of silently never firing."""
    return list(_hook_sites(model, include_opt_in))


def _hook_sites(model, include_opt_in: bool = False) -> dict[str, tuple]:
    """Full name -> the ``(layer, short name)`` the model's hook site passes, in execution order."""
    sandwich = hasattr(next(iter(model.model.layers.values())), "post_feedforward_layernorm")
    sites = {"hook_embed": (None, "hook_embed")}
    for i, layer in enumerate(model.model.layers.values()):
        absent = getattr(layer, "absent_hook_points", ())
        for n in LAYER_HOOKS:
            if (n in SANDWICH_ONLY and not sandwich) or (n in OPT_IN and not include_opt_in) or n in absent:
                continue
            sites[f"blocks.{i}.{n}"] = (i, n)
    for n in ("ln_final.hook_normalized", "hook_logits"):
        sites[n] = (None, n)
    return sites


@dataclass
class HookRef:
    """Second argument of a hook function, as in TransformerLens: ``fn(tensor, hook)``."""

    name: str

    def layer(self) -> int | None:
        m = re.match(r"blocks\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


def _from_tl(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bhsd" else x  # (B,S,H,D) -> (B,H,S,D)


class ActivationCache(dict):
    """``cache["blocks.3.hook_resid_post"]`` or the shorthand ``cache["resid_post", 3]``."""

    def _n_layers(self) -> int:
        return 1 + max((int(k.split(".")[1]) for k in self.keys() if k.startswith("blocks.")), default=-1)

    def _key(self, key):
        if isinstance(key, tuple):
            layer = key[1] if len(key) > 1 else None
            if layer is not None and layer < 0:  # cache["resid_post", -1], as in TransformerLens
                layer += self._n_layers()
            return act_name(key[0], layer)
        return GLOBAL_SHORT.get(key, key)

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __contains__(self, key):
        return super().__contains__(self._key(key))

    def get(self, key, default=None):
        return super().get(self._key(key), default)

    def stack(self, name: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """``[n_layers, ...]`` of one per-layer hook (e.g. every ``resid_post``)."""
        return torch.stack([self[name, i] for i in (layers if layers is not None else range(self._n_layers()))])


NameOrPred = str | Callable[[str], bool]


class Hooks:
    """The hooks active for one or more forwards; bound to each forward's context."""

    def __init__(self, model, fwd_hooks: list[tuple[NameOrPred, Callable]] = (), cache: dict | None = None,
                 names_filter: NameOrPred | Iterable[str] | None = None, detach: bool = True,
                 include_opt_in: bool = False):
        self.cache = cache
        self.detach = detach
        sites = _hook_sites(model, include_opt_in=True)
        # a predicate never switches on an opt-in point (attn.hook_result changes the o_proj path); a name does
        pred_names = [n for n, (_, short) in sites.items() if include_opt_in or short not in OPT_IN]
        self.fns: dict[str, list[Callable]] = {}
        for target, fn in fwd_hooks:
            if callable(target):
                matched = [n for n in pred_names if target(n)]
            else:  # a name: one dict lookup (not a scan: run_with_hooks may name every point)
                name = act_name(*target) if isinstance(target, tuple) else target
                matched = [name] if name in sites else []
            if not matched:
                raise KeyError(f"hook point {target!r} does not exist (e.g. {pred_names[1]!r})")
            for n in matched:
                self.fns.setdefault(n, []).append(fn)
        self.cache_names: set[str] = set()
        if cache is not None:
            if names_filter is None:
                self.cache_names = set(pred_names)
            elif callable(names_filter):
                self.cache_names = {n for n in pred_names if names_filter(n)}
            else:
                wanted = {names_filter} if isinstance(names_filter, str) else {
                    act_name(*n) if isinstance(n, tuple) else n for n in names_filter}
                unknown = wanted - sites.keys()
                if unknown:
                    raise KeyError(f"hook point {sorted(unknown)[0]!r} does not exist")
                self.cache_names = wanted
        self.active = set(self.fns) | self.cache_names
        # one plan per active site, keyed as the model calls it, (layer, short name): the full name, the
        # functions to run, whether to cache. Built once here, so a site costs one dict lookup per call
        # (inactive sites: a miss) and names_filter is never matched inside a forward.
        self._plans: dict[tuple, tuple[str, tuple, bool]] = {
            sites[n]: (n, tuple(self.fns.get(n, ())), n in self.cache_names) for n in self.active}
        self.eager_layers = {sites[n][0] for n in self.active if sites[n][1] in EAGER}

    def bind(self, ctx) -> None:
        ctx.hooks = self
        ctx.eager_layers = set(ctx.eager_layers) | self.eager_layers

    def wants(self, layer, name) -> bool:
        return (layer, name) in self._plans

    def __call__(self, layer, name, x, layout):
        plan = self._plans.get((layer, name))
        if plan is None:
            return x
        full, fns, cache = plan
        t = x.transpose(1, 2) if layout == "bhsd" else x  # (B,H,S,D) -> (B,S,H,D), a view
        if not fns:  # caching only: store a reference (nothing later writes into these tensors)
            self.cache[full] = t.detach() if self.detach else t
            return x
        changed = False
        ref = HookRef(full)
        for fn in fns:
            r = fn(t, ref)
            if r is not None:
                if r.shape != t.shape:
                    raise ValueError(f"hook on {full} returned shape {tuple(r.shape)}, expected {tuple(t.shape)}")
                t, changed = r, True
        if cache:
            self.cache[full] = t.detach() if self.detach else t
        return _from_tl(t, layout) if changed else x


@contextlib.contextmanager
def hooks(model, fwd_hooks: list[tuple[NameOrPred, Callable]] = (), cache: dict | None = None,
          names_filter=None, detach: bool = True, include_opt_in: bool = False):
    """Attach hooks to every forward of ``model`` inside the block (kept in ``model.transforms.hooks``,
    which each forward binds to its context)."""
    h = Hooks(model, fwd_hooks, cache, names_filter, detach, include_opt_in)
    state = model.transforms
    prev, state.hooks = state.hooks, h
    try:
        yield h
    finally:
        state.hooks = prev


def run_with_cache(model, input_ids=None, names_filter=None, *, detach: bool = True, include_opt_in: bool = False,
                   **forward_kwargs):
    """``(logits, cache)``; every hook point cached unless ``names_filter`` narrows it."""
    cache = ActivationCache()
    with hooks(model, cache=cache, names_filter=names_filter, detach=detach, include_opt_in=include_opt_in):
        logits = model(input_ids, **forward_kwargs)
    return logits, cache


def run_with_hooks(model, input_ids=None, fwd_hooks=(), **forward_kwargs):
    with hooks(model, fwd_hooks=list(fwd_hooks)):
        return model(input_ids, **forward_kwargs)
