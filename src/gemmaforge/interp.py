"""Interpretability tools on top of the hook points (``transforms/hooks.py``).

    import gemmaforge
    from gemmaforge import interp
    model = gemmaforge.from_pretrained("gemma-3-270m"); tok = gemmaforge.load_tokenizer("gemma-3-270m")
    ids = torch.tensor([tok.encode("The capital of France is")])
    interp.W_Q(model).shape                       # [n_layers, n_heads, d_model, d_head]
    lens = interp.logit_lens(model, ids, k=5)     # top-5 tokens of every layer's residual stream
    dla = interp.direct_logit_attribution(model, ids, tok.token_to_id("▁Paris"))
    scores = interp.activation_patching(model, clean, corrupted, "resid_post", metric)
    interp.attention_heatmaps(model, tok, "The capital of France is", "out/")

Conventions follow TransformerLens: weights act on the right (``x @ W``), per-head weights are
``[head, d_model, d_head]``, the residual stream is ``[batch, pos, d_model]``. Unlike
TransformerLens nothing is folded or centred by default: every tool reads the model exactly as it
computes. ``fold_norm_weights`` is the one opt-in weight rewrite.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import InputError
from .layers.norm import GemmaRMSNorm, RMSNorm
from .transforms.hooks import act_name, hooks
from .transforms.lora import effective_weight

__all__ = [
    "TLWeights", "W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_gate", "W_in", "W_out",
    "fold_norm_weights", "activation_patching", "logit_lens", "LogitLens", "direct_logit_attribution",
    "attention_heatmaps", "logit_lens_table", "token_labels",
]


# ============================================================================ model structure

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


# ============================================================================ weights, TransformerLens style

def W_E(model) -> torch.Tensor:
    """Token embedding ``[vocab, d_model]`` as stored (Gemma multiplies it by ``sqrt(d_model)`` in
    ``hook_embed``: ``cache["embed"] == W_E[ids] * model.model.embed_tokens.scale`` cast to the dtype)."""
    return model.model.embed_tokens.weight.detach()


def W_U(model) -> torch.Tensor:
    """Unembedding ``[d_model, vocab]``: ``logits = ln_final @ W_U`` (then the final softcap, if any)."""
    return model.head_weight().detach().T


def _w(linear) -> torch.Tensor:
    """The weight a projection applies, detached: ``W`` itself (a view), or ``W + scaling * B @ A``
    (a new tensor) for a projection carrying an unmerged LoRA adapter."""
    return effective_weight(linear).detach()


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


# ============================================================================ folding norms

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
    if type(head) is not nn.Linear:
        raise InputError(f"fold_norm_weights: lm_head is a {type(head).__name__}, not a plain Linear")
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


# ============================================================================ logit lens

@dataclass
class LogitLens:
    """Rows: ``labels[r]`` = "embed" then "0".."L-1" (each layer's ``resid_post``).

    ``top_ids`` / ``top_probs``: ``[n_layers + 1, *ids.shape, k]``; ``logprobs`` (only with
    ``return_logprobs``): ``[n_layers + 1, *ids.shape, vocab]``.
    """

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    labels: list[str]
    logprobs: torch.Tensor | None = None


def _decode_resid(model, h: torch.Tensor) -> torch.Tensor:
    """Residual stream -> final norm -> LM head (with the final softcap): what the model's logits are."""
    return model.logits(model.model.norm(h))


@torch.no_grad()
def logit_lens(model, input_ids, k: int = 5, return_logprobs: bool = False, layers: Iterable[int] | None = None
               ) -> LogitLens:
    """Decode the embedding and each layer's ``resid_post`` through the final norm and LM head.

    The last row equals the model's own log-softmax. ``layers`` limits the rows (the embedding row
    is always first). Decoding is done one layer at a time, so memory holds one ``[*ids, vocab]``
    block unless ``return_logprobs``.
    """
    lead = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
    ids = _as_ids(model, input_ids)
    lead = lead or tuple(ids.shape)
    n_layers = len(_layers(model))
    layers = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    names = ["hook_embed"] + [act_name("resid_post", lay) for lay in layers]
    _, cache = model.run_with_cache(ids, names_filter=names, return_hidden=True)
    k = min(k, model.config.vocab_size)
    tops_i, tops_p, lps = [], [], []
    for n in names:
        lp = torch.log_softmax(_decode_resid(model, cache[n]).float(), dim=-1)
        p, i = lp.topk(k, dim=-1)
        tops_i.append(i.reshape(*lead, k))
        tops_p.append(p.exp().reshape(*lead, k))
        if return_logprobs:
            lps.append(lp.reshape(*lead, lp.shape[-1]))
    return LogitLens(torch.stack(tops_i), torch.stack(tops_p), ["embed"] + [str(x) for x in layers],
                     torch.stack(lps) if return_logprobs else None)


# ============================================================================ direct logit attribution

@torch.no_grad()
def direct_logit_attribution(model, input_ids, target_id: int, position: int = -1, heads: bool = True) -> dict:
    """Each block's direct contribution to the (pre-softcap) logit of ``target_id`` at ``position``.

    The final residual is ``embed + sum_l (attn_l + mlp_l)`` where for Gemma ``attn_l`` / ``mlp_l``
    are the outputs of the post-attention / post-feedforward norms (what is added to the residual).
    The final norm ``rms(h) * s`` is linear in ``h`` once its ``1/rms`` is frozen at its value on
    the full residual, so with ``u = W_U[:, target] * s / rms(h_final)`` each contribution is
    ``component . u`` and they sum to the pre-softcap target logit (up to fp32 rounding).

    With ``heads``: ``attn_heads[l, h]`` splits ``attn[l]`` over heads (each head's ``z @ W_O[h]``;
    for Gemma the post-attention norm's ``1/rms`` is frozen the same way), so they sum to ``attn[l]``.

    Returns a dict: ``embed`` (float), ``attn`` / ``mlp`` (``[n_layers]``), ``attn_heads``
    (``[n_layers, n_heads]``, with ``heads``), ``total`` (sum of the contributions), ``logit`` (the
    model's pre-softcap logit), ``final_logit`` (after the softcap: the model's output),
    ``rms_scale`` (the frozen ``1/rms``), ``target_id``, ``position``. Needs one sequence.
    """
    ids = _as_ids(model, input_ids)
    if ids.shape[0] != 1:
        raise InputError(f"direct_logit_attribution takes one sequence; got a batch of {ids.shape[0]}")
    S = ids.shape[1]
    if not -S <= position < S:
        raise InputError(f"position {position} out of range for {S} tokens")
    V = model.config.vocab_size
    if not 0 <= int(target_id) < V:
        raise InputError(f"target id {target_id} is outside the vocabulary (0..{V - 1})")
    pos = position % S
    layers = _layers(model)
    sandwich = _sandwich(layers[0])
    attn_name, mlp_name = ("ln1_post", "ln2_post") if sandwich else ("attn_out", "mlp_out")
    names = ["hook_embed", "ln_final.hook_normalized"]
    for i in range(len(layers)):
        names += [act_name(attn_name, i), act_name(mlp_name, i), act_name("resid_post", i)]
        if heads:
            names.append(act_name("result", i))
    _, cache = model.run_with_cache(ids, names_filter=names, include_opt_in=heads, return_hidden=True)

    final = cache["resid_post", len(layers) - 1][0, pos].float()
    norm = model.model.norm
    rms_scale = torch.rsqrt(final.pow(2).mean() + norm.eps)
    w_t = model.head_weight()[int(target_id)].float()
    u = w_t * norm.scale().to(w_t.device) * rms_scale

    def contrib(x: torch.Tensor) -> torch.Tensor:
        return x.float() @ u

    embed = float(contrib(cache["embed"][0, pos]))
    attn = torch.stack([contrib(cache[attn_name, i][0, pos]) for i in range(len(layers))]).cpu()
    mlp = torch.stack([contrib(cache[mlp_name, i][0, pos]) for i in range(len(layers))]).cpu()
    out = {"embed": embed, "attn": attn, "mlp": mlp}
    if heads:
        per = []
        for i, layer in enumerate(layers):
            res = cache["result", i][0, pos].float()  # [H, d_model]
            if sandwich:  # o_proj's output (the sum of the heads) is what the post-attention norm normalises
                pn = layer.post_attention_layernorm
                a = res.sum(0)
                res = res * (pn.scale().to(res.device) * torch.rsqrt(a.pow(2).mean() + pn.eps))
            per.append(res @ u)
        out["attn_heads"] = torch.stack(per).cpu()
    logit = float(cache["ln_final"][0, pos].float() @ w_t)
    cap = getattr(model.config, "final_logit_softcapping", None)
    out.update(
        total=embed + float(attn.sum()) + float(mlp.sum()),
        logit=logit,
        final_logit=math.tanh(logit / cap) * cap if cap is not None else logit,
        rms_scale=float(rms_scale),
        target_id=int(target_id),
        position=pos,
    )
    return out


# ============================================================================ pictures

def _piece(tokenizer, i: int) -> str:
    if tokenizer is None:
        return str(i)
    if hasattr(tokenizer, "id_to_token"):
        s = tokenizer.id_to_token(int(i))
    else:  # a transformers tokenizer
        s = tokenizer.convert_ids_to_tokens(int(i))
    return f"<{i}>" if s is None else s


def _raw_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    return [_piece(tokenizer, i).replace("▁", " ") for i in ids]


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Printable token strings: sentencepiece's ``▁`` shown as a space, newlines as ``\\n``."""
    return [s.replace("\n", "\\n").replace("\t", "\\t") for s in _raw_labels(tokenizer, ids)]


def _mpl_safe(s: str) -> str:
    return s.replace("$", r"\$")  # matplotlib would start mathtext


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("the prompt is empty")
        return list(tokenizer.encode(prompt))
    ids = [int(x) for x in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    if not ids:
        raise InputError("the prompt is empty")
    return ids


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _tick_step(n: int, most: int = 48) -> int:
    return max(1, math.ceil(n / most))


@torch.no_grad()
def attention_heatmaps(model, tokenizer, prompt, out_dir, layers: Iterable[int] | None = None,
                       max_layers: int | None = None, on_layer: Callable[[int], None] | None = None,
                       dpi: int = 100) -> list[Path]:
    """One PNG per layer (``attn_layer_XX.png``), one panel per head: query tokens down, key tokens
    across, colour = attention probability. ``prompt``: text (encoded with BOS) or token ids.
    ``layers`` / ``max_layers`` choose the layers (default all); ``on_layer(i)`` is called after each."""
    plt = _pyplot()
    ids = _encode(tokenizer, prompt)
    n_layers = len(_layers(model))
    chosen = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    if max_layers is not None:
        chosen = chosen[:max(0, int(max_layers))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [act_name("pattern", i) for i in chosen]
    _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names_filter=names, return_hidden=True)
    labels = [_mpl_safe(s) for s in token_labels(tokenizer, ids)]
    S = len(ids)
    step = _tick_step(S)
    ticks = list(range(0, S, step))
    types = getattr(model.config, "layer_types", None)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fonts lack glyphs for some tokens
        for i in chosen:
            paths.append(_heatmap(plt, cache["pattern", i][0].float().cpu(), i, types, labels, ticks, out, dpi))
            if on_layer is not None:
                on_layer(i)
    return paths


def _heatmap(plt, pat: torch.Tensor, i: int, types, labels, ticks, out: Path, dpi: int) -> Path:
    """One layer's figure: pat [H, q, k]."""
    S = len(labels)
    H = pat.shape[0]
    ncols = min(H, 4)
    nrows = math.ceil(H / ncols)
    side = min(9.0, max(3.0, 0.22 * S + 1.5))
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 1.0, side * nrows + 0.6), squeeze=False,
                             layout="constrained")
    kind = f" ({types[i]})" if types is not None else ""
    fig.suptitle(f"layer {i}{kind}: attention pattern, query rows x key columns")
    fs = 8 if S <= 24 else 6
    im = None
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(pat[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}")
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=fs)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=fs)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    path = out / f"attn_layer_{i:02d}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.no_grad()
def logit_lens_table(model, tokenizer, prompt, out_dir, k: int = 5, stem: str = "logit_lens",
                     dpi: int = 100) -> tuple[Path, Path]:
    """Write ``<stem>.png`` (rows = embedding and each layer, columns = positions, colour = top-1
    probability, text = top-1 token) and ``<stem>.txt`` (the top-``k`` tokens with probabilities of
    every layer at every position). Returns the two paths."""
    plt = _pyplot()
    ids = _encode(tokenizer, prompt)
    lens = logit_lens(model, torch.tensor([ids], device=model.device), k=k)
    top_i, top_p = lens.top_ids[:, 0].cpu(), lens.top_probs[:, 0].cpu()  # [R, S, k]
    R, S = top_i.shape[:2]
    raw = _raw_labels(tokenizer, ids)
    inputs = token_labels(tokenizer, ids)
    rows = ["embed"] + [f"layer {x}" for x in lens.labels[1:]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # text table
    lines = [f"logit lens: top-{k} next-token predictions of the residual stream after each layer",
             f"(decoded through the final norm and the LM head); {S} tokens, {R - 1} layers", ""]
    width = max(len(r) for r in rows)
    for s in range(S):
        lines.append(f"position {s}  input {raw[s]!r}")
        for r in range(R):
            cells = "  ".join(f"{t!r} {p:.3f}" for t, p in zip(_raw_labels(tokenizer, top_i[r, s].tolist()),
                                                              top_p[r, s].tolist()))
            lines.append(f"  {rows[r]:<{width}}  {cells}")
        lines.append("")
    txt = out / f"{stem}.txt"
    txt.write_text("\n".join(lines), encoding="utf-8")

    # picture
    png = out / f"{stem}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fonts lack glyphs for some tokens
        _lens_figure(plt, top_i[:, :, 0], top_p[:, :, 0].numpy(), tokenizer, inputs, rows, png, dpi)
    return png, txt


def _lens_figure(plt, top1: torch.Tensor, probs, tokenizer, inputs, rows, path: Path, dpi: int) -> None:
    R, S = top1.shape
    fig_w = min(40.0, max(6.0, 1.0 * S + 2.5))
    fig_h = min(40.0, max(3.0, 0.38 * R + 1.8))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    im = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fs = 7 if S <= 24 else 5
    for r in range(R):
        for s, t in enumerate(token_labels(tokenizer, top1[r].tolist())):
            t = t if len(t) <= 10 else t[:9] + "…"
            ax.text(s, r, _mpl_safe(t), ha="center", va="center", fontsize=fs,
                    color="white" if probs[r, s] > 0.5 else "black")
    step = _tick_step(S)
    ax.set_xticks(range(0, S, step), [_mpl_safe(inputs[s]) for s in range(0, S, step)], rotation=90, fontsize=7)
    ax.set_yticks(range(R), rows, fontsize=7)
    ax.set_xlabel("input token (prediction is for the next one)")
    ax.set_title("logit lens: top-1 token per layer and position (colour: its probability)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
