"""The logit lens and direct logit attribution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import InputError
from ..models.common.hooks import act_name
from .common import _as_ids, _layers, _sandwich

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
    extra = [i for i, lay in enumerate(layers) if getattr(lay, "ple", 0)
             or ("layer_scalar" in dict(lay.named_buffers()) and not bool((lay.layer_scalar == 1).all()))]
    if extra:
        raise InputError(f"direct_logit_attribution: layer {extra[0]} changes the residual outside attention and "
                         f"the MLP (per-layer inputs or a layer scale), which this decomposition does not attribute")
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
    w_t = model.lm_head.matrix()[int(target_id)].float()
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
    cap = model.lm_head.softcap
    out.update(
        total=embed + float(attn.sum()) + float(mlp.sum()),
        logit=logit,
        final_logit=math.tanh(logit / cap) * cap if cap is not None else logit,
        rms_scale=float(rms_scale),
        target_id=int(target_id),
        position=pos,
    )
    return out
