"""What every causal LM family shares: input checking, the per-forward context, the LM head.

A family model file defines its decoder layers and ``embed``/``run_layers``; this base turns the
user's inputs (padded, packed or cached) into one explicit ``ForwardContext`` that every layer
reads: RoPE tables per layer type, document layout, backend, optional KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..layers.attention import SeqInfo, build_seq_info, resolve_backend
from ..layers.kv_cache import KVCache
from ..layers.attention import AttnCall, attention
from ..layers.rope import apply_rope, rope_table
from ..transforms.lora import effective_weight


@dataclass
class ForwardContext:
    info: SeqInfo
    rope: dict  # layer type -> (cos, sin), each [B, S, head_dim]
    backend: str
    cache: KVCache | None = None
    # layer indices whose attention must run the eager backend and expose probabilities (hooks)
    eager_layers: set = field(default_factory=set)
    # shared per-forward state between layers (e.g. Gemma 4 KV sharing); a fresh dict each forward
    shared: dict = field(default_factory=dict)
    # interpretability hooks (transforms/hooks.py); None = no hook anywhere, each site costs one call
    hooks: object | None = None

    def hook(self, layer: int | None, name: str, x: torch.Tensor, layout: str = "bsd") -> torch.Tensor:
        """A named hook site (TransformerLens names). Returns ``x`` or a hook's replacement."""
        return x if self.hooks is None else self.hooks(layer, name, x, layout)

    def mlp_hook(self, layer: int):
        return None if self.hooks is None else (lambda name, x: self.hooks(layer, name, x, "bsd"))

    def wants(self, layer: int | None, name: str) -> bool:
        return self.hooks is not None and self.hooks.wants(layer, name)


def rope_cache_attend(q, k, v, ctx: ForwardContext, *, layer_idx: int, layer_type: str, window, scale: float,
                      softcap=None, bidirectional_groups: bool = False) -> torch.Tensor:
    """The part of self-attention every family shares, after projections (and q/k norms):
    apply this layer type's RoPE, append to the KV cache if any, attend under the composed mask
    (``bidirectional_groups``: the tokens of one image, ``ctx.info.groups``, see each other).
    q [B,H,S,D], k/v [B,Hkv,S,D] -> [B,H,S,D]."""
    i = layer_idx
    q, k, v = (ctx.hook(i, n, t, "bhsd") for n, t in (("attn.hook_q", q), ("attn.hook_k", k), ("attn.hook_v", v)))
    cos, sin = ctx.rope[layer_type]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = ctx.hook(i, "attn.hook_rot_q", q, "bhsd"), ctx.hook(i, "attn.hook_rot_k", k, "bhsd")
    info = ctx.info
    k_doc, k_idx = info.doc, info.idx
    if ctx.cache is not None:
        k, v, k_doc, k_idx = ctx.cache.update(layer_idx, k, v, info.doc, info.idx)
    call = AttnCall(info, k_doc, k_idx, window, scale, softcap, ctx.cache is None,
                    bidirectional_groups=bidirectional_groups)
    if i in ctx.eager_layers:  # hooks read scores / pattern: the explicit reference path, this call only
        call.tap = lambda name, t: ctx.hook(i, name, t, "bhqk")
        out, _ = attention(q, k, v, call, "eager")
    else:
        out, _ = attention(q, k, v, call, ctx.backend)
    return out


def attn_output(o_proj: nn.Module, out: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
    """Per-head attention output ``z`` -> ``o_proj``. out: [B,H,S,D] -> [B,S,hidden]."""
    B, H, S, D = out.shape
    z = ctx.hook(layer_idx, "attn.hook_z", out.transpose(1, 2), "bshd")  # (B, S, H, D)
    if ctx.wants(layer_idx, "attn.hook_result"):
        # opt-in: each head's contribution through its slice of W_O, (B, S, H, hidden); they sum to o_proj(z).
        # W_O is the weight o_proj applies: an unmerged LoRA adapter folded in (its dropout is not applied)
        w = effective_weight(o_proj)
        w = w.view(w.shape[0], H, D)
        result = ctx.hook(layer_idx, "attn.hook_result", torch.einsum("bshd,mhd->bshm", z, w), "bshd")
        bias = getattr(o_proj, "bias", None)
        return result.sum(2) if bias is None else result.sum(2) + bias
    return o_proj(z.reshape(B, S, -1))


def sandwich_attention(layer: nn.Module, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The attention half of a sandwich-norm decoder layer (Gemma 3 and 4), with its TransformerLens
    hook sites: ``h + post_norm(attn(input_norm(h)))``, the residual at ``hook_resid_mid``. As in
    TransformerLens, ``hook_attn_out`` is what reaches the residual (after the post-norm)."""
    i, hk = layer.layer_idx, ctx.hook
    h = hk(i, "hook_resid_pre", h)
    a = layer.self_attn(hk(i, "ln1.hook_normalized", layer.input_layernorm(hk(i, "hook_attn_in", h))), ctx)
    a = hk(i, "hook_attn_out", hk(i, "ln1_post.hook_normalized", layer.post_attention_layernorm(a)))
    return hk(i, "hook_resid_mid", h + a)


def sandwich_mlp(layer: nn.Module, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The dense MLP of a sandwich-norm layer on the pre-MLP norm of ``h`` (before its post-norm)."""
    i = layer.layer_idx
    return layer.mlp(ctx.hook(i, "ln2.hook_normalized", layer.pre_feedforward_layernorm(h)), ctx.mlp_hook(i))


def sandwich_mlp_out(layer: nn.Module, m: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """The MLP output's post-norm: what the residual receives (``hook_mlp_out``)."""
    i, hk = layer.layer_idx, ctx.hook
    return hk(i, "hook_mlp_out", hk(i, "ln2_post.hook_normalized", layer.post_feedforward_layernorm(m)))


HEAD_VOCAB_BLOCK = 1024  # CPU, fp32: the LM head's product in blocks of this many vocabulary rows
HEAD_BLOCKED_ROWS = (2, 512)  # ... for this many tokens (a single token's product is a GEMV: MKL's is faster)


def head_product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` for the LM head (``weight [V, H]``).

    On CPU in fp32, for 2..512 tokens, the product runs in blocks of ``HEAD_VOCAB_BLOCK``
    vocabulary rows written into one output: MKL's ``h @ W.T`` over the whole 262k-row table was
    1.2-1.9x slower for those shapes on a 2-core AVX2 machine (13 tokens: 214 -> 133 ms at 2
    threads), with identical results there (bench/RESULTS.md, issue 7). Its backward is
    ``F.linear``'s. Elsewhere (one token: a GEMV, MKL's is faster; GPUs; under compile) it is
    ``F.linear``."""
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    lo, hi = HEAD_BLOCKED_ROWS
    if not (hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32 and lo <= rows <= hi
            and not torch.compiler.is_compiling()):
        return F.linear(hidden, weight)
    z = _BlockedHead.apply(hidden.reshape(rows, hidden.shape[-1]), weight)
    return z.view(*hidden.shape[:-1], weight.shape[0])


class _BlockedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        v = weight.shape[0]
        out = h.new_empty(h.shape[0], v)
        for s in range(0, v, HEAD_VOCAB_BLOCK):
            e = min(s + HEAD_VOCAB_BLOCK, v)
            torch.mm(h, weight[s:e].t(), out=out[:, s:e])
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        gh = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.t() @ h if ctx.needs_input_grad[1] else None
        return gh, gw


def splice_embeds(h: torch.Tensor, extra: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Put ``extra`` [B, N, H] at ``positions`` [B, N] of ``h`` [B, S, H] (out of place, differentiable)."""
    if positions is None:
        raise InputError("extra_embeds needs extra_positions (where in the sequence the features go)")
    B, S, H = h.shape
    extra = extra.reshape(B, -1, H) if extra.dim() == 2 else extra
    positions = positions.reshape(B, -1).to(h.device)
    if extra.shape[:2] != positions.shape:
        raise InputError(f"extra_embeds {tuple(extra.shape)} and extra_positions {tuple(positions.shape)} disagree")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= S):
        raise InputError(f"extra_positions must lie in [0, {S}); got {int(positions.min())}..{int(positions.max())}")
    b = torch.arange(B, device=h.device)[:, None].expand_as(positions)
    return h.index_put((b, positions), extra.to(h.dtype))


class CausalLM(nn.Module):
    """Base class: subclasses set ``self.config``, ``self.model`` (embed_tokens, layers, norm), ``self.lm_head``."""

    config: object
    # families whose image tokens attend bidirectionally (``mm_groups``); the others reject it
    supports_mm_groups: bool = False

    # ---- pieces subclasses provide ----
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope_specs(self) -> dict:
        """layer type -> (RopeSpec, rotary head_dim)."""
        raise NotImplementedError

    # ---- head ----
    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = head_product(hidden, self.head_weight())
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

    # ---- forward ----
    def check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise InputError(f"token id {bad} is outside the vocabulary (0..{V - 1})")

    def make_context(self, B, S, device, dtype, *, cu_seqlens=None, position_ids=None, attention_mask=None,
                     cache=None, attn_backend=None, mm_groups=None) -> ForwardContext:
        past = cache.seen if cache is not None else 0
        if cache is not None and past and attention_mask is not None and not bool(attention_mask.all()):
            raise InputError("incremental decoding with a padding mask is not supported; decode rows one at a time")
        if mm_groups is not None and not self.supports_mm_groups:
            raise InputError(f"mm_groups: {type(self).__name__} has no bidirectional image attention")
        info = build_seq_info(B, S, device, cu_seqlens=cu_seqlens, position_ids=position_ids,
                              attention_mask=attention_mask, past_len=past, groups=mm_groups)
        # a packed row may be longer than the context: positions restart in every document
        longest = info.max_seqlen if info.cu_seqlens is not None else past + S
        if longest > self.config.max_position_embeddings and position_ids is None:
            raise InputError(
                f"sequence of {longest} tokens exceeds the model's context of {self.config.max_position_embeddings}"
            )
        rope = {t: rope_table(spec, hd, info.positions, dtype) for t, (spec, hd) in self.rope_specs().items()}
        backend = resolve_backend(attn_backend or getattr(self, "attn_backend", None), device,
                                  getattr(self.config, "head_dim", 256))
        return ForwardContext(info=info, rope=rope, backend=backend, cache=cache)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_backend: str | None = None,
        return_hidden: bool = False,
        extra_embeds: torch.Tensor | None = None,
        extra_positions: torch.Tensor | None = None,
        mm_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` (or ``[T, V]`` for a 1-D packed row); final hidden states if ``return_hidden``.

        Packed: ``input_ids`` ``[T]`` / ``[1, T]`` (or ``[B, S]`` flattened) with ``cu_seqlens``
        ``[0, l1, l1+l2, ..., T]``; positions restart in every document and no token sees another
        document. Padded: ``attention_mask`` ``[B, S]``; each row equals its unpadded self.
        ``inputs_embeds`` are used as given (not scaled again).

        Multimodal prefixes: ``extra_embeds`` ``[B, N, hidden]`` (``[N, hidden]`` for a 1-D row)
        replace the token embeddings at ``extra_positions`` ``[B, N]`` (``[N]``). Scaling rule: text
        tokens go through the scaled embedding (Gemma: ``* sqrt(hidden)``) exactly once; spliced
        features are used AS GIVEN, never scaled, so an encoder/projector must produce vectors at
        the scale of scaled token embeddings (``gemmaforge.multimodal.Projector`` learns it).

        ``mm_groups`` ``[B, S]`` (``[T]`` packed): -1 for text, one id ``>= 0`` per image; the
        tokens of one image attend to each other bidirectionally (Gemma 3: every layer; Gemma 4:
        sliding layers), within their document. ``gemmaforge.multimodal.group_ids_from_token_types``
        builds it from the reference's ``token_type_ids``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        lead = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if input_ids is not None:
            self.check_ids(input_ids)
            x = input_ids.reshape(1, -1) if (input_ids.dim() == 1 or cu_seqlens is not None) else input_ids
            h = self.embed(x)
        else:
            h = inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1]) if (
                inputs_embeds.dim() == 2 or cu_seqlens is not None) else inputs_embeds
        if extra_embeds is not None:
            h = splice_embeds(h, extra_embeds, extra_positions)
        B, S, _ = h.shape
        ctx = self.make_context(B, S, h.device, h.dtype, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                attention_mask=attention_mask, cache=cache, attn_backend=attn_backend,
                                mm_groups=mm_groups)
        hooks = getattr(self, "_active_hooks", None)
        if hooks is not None:
            hooks.bind(ctx)
        h = ctx.hook(None, "hook_embed", h)
        h = self.run_layers(h, ctx)
        if cache is not None:
            cache.advance(S)
        out = h if return_hidden else ctx.hook(None, "hook_logits", self.logits(h))
        return out.reshape(*lead, out.shape[-1])

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        for layer in self.model.layers.values():
            h = layer(h, ctx)
        return ctx.hook(None, "ln_final.hook_normalized", self.model.norm(h))

    # ---- interpretability (the machinery lives in transforms/hooks.py) ----
    def run_with_cache(self, input_ids=None, names_filter=None, **forward_kwargs):
        """``(logits, cache)`` with TransformerLens hook names; ``cache["resid_post", i]`` works."""
        from ..transforms.hooks import run_with_cache

        return run_with_cache(self, input_ids, names_filter, **forward_kwargs)

    def run_with_hooks(self, input_ids=None, fwd_hooks=(), **forward_kwargs):
        """``fwd_hooks=[(name_or_predicate, fn)]``; ``fn(tensor, hook)`` may return a replacement."""
        from ..transforms.hooks import run_with_hooks

        return run_with_hooks(self, input_ids, fwd_hooks, **forward_kwargs)

    def hooks(self, fwd_hooks=(), cache=None, names_filter=None):
        """Context manager attaching hooks to every forward inside it."""
        from ..transforms.hooks import hooks

        return hooks(self, list(fwd_hooks), cache=cache, names_filter=names_filter)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache([self.config.window_for(t) for t in self.config.layer_types], max_len)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
