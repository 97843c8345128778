"""What every causal LM family shares: input checking, the per-forward context, the forward itself.

A family model builds ``self.model`` (``embed_tokens``, ``layers`` keyed by ``str(i)``, ``norm``) and
``self.lm_head`` (``layers.head.LMHead``) and defines its decoder layers; this base turns the user's
inputs (padded, packed or cached) into one explicit ``ForwardContext`` that every layer reads.

The forward goes through what is there: a pipeline stage is this same class with the absent parts
set to None (no ``embed_tokens``: it takes hidden states as ``inputs_embeds``; no ``norm``: it
returns the last layer's output; no ``lm_head``: it returns hidden states) and the layers of other
stages removed, so nothing replaces its forward. Everything that transforms a model (LoRA,
activation checkpointing, parallel layouts, CPU policies) wraps or swaps submodules from outside;
the little state a transform keeps on the model is declared in ``TransformState``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from ...layers.attention import build_seq_info, resolve_backend
from ...layers.kv_cache import KVCache
from ...layers.rope import rope_table
from .context import ForwardContext
from .media import place_media, split_media


@dataclass
class TransformState:
    """What transforms keep on a model, declared in one place (``model.transforms``)."""

    hooks: object | None = None  # models.common.hooks: the Hooks bound to every forward (``model.hooks()``)
    lora: object | None = None  # adapters.lora: the LoraConfig of the applied adapters
    parallel: object | None = None  # parallel.parallelize: the ParallelState of the applied layout


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


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of the model's decoder blocks, in order (a pipeline stage: its own)."""
    return [(f"model.layers.{k}", m) for k, m in model.model.layers.items()]


class CausalLM(nn.Module):
    """Base class: subclasses build ``self.model`` (embed_tokens, layers, norm) and ``self.lm_head``."""

    # families whose image tokens attend bidirectionally (``mm_groups``); the others reject it
    supports_mm_groups: bool = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn_backend: str | None = None  # default attention backend of every forward (None: auto)
        self.transforms = TransformState()

    # ---- pieces subclasses provide ----
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rope_specs(self) -> dict:
        """layer type -> (RopeSpec, rotary head_dim)."""
        raise NotImplementedError

    def media_specs(self) -> list:
        """The media this model reads (``models.common.media.MediaSpec``, one per modality); none for a
        text-only model, which refuses media keywords with one line."""
        return []

    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        """The family's random init of one parameter (by its name in the full model), in place."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Set persistent buffers to their initial values (after ``to_empty``)."""

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init of every parameter and buffer (``init_parameter``, ``init_buffers``)."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std, generator)
        self.init_buffers()

    def prepare(self, h: torch.Tensor, ctx: ForwardContext, input_ids: torch.Tensor | None, **family_inputs) -> None:
        """Family-specific per-forward inputs, put on ``ctx.state`` before the layers run (Gemma 4:
        per-layer embeddings). The base family takes none."""
        if family_inputs:
            raise TypeError(f"{type(self).__name__}.forward got unexpected keyword arguments {sorted(family_inputs)}")

    # ---- head ----
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

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
        if cache is not None and not getattr(cache, "single_doc", True):
            info.single_doc = False  # the cache holds keys of other documents (a ragged batch's padding)
        # a packed row may be longer than the context: positions restart in every document
        longest = info.max_seqlen if info.cu_seqlens is not None else past + S
        if longest > self.config.max_position_embeddings and position_ids is None:
            raise InputError(
                f"sequence of {longest} tokens exceeds the model's context of {self.config.max_position_embeddings}"
            )
        rope = {t: rope_table(spec, hd, info.positions, dtype) for t, (spec, hd) in self.rope_specs().items()}
        backend = resolve_backend(attn_backend or self.attn_backend, device, getattr(self.config, "head_dim", 256))
        ctx = ForwardContext(info, rope, backend, cache)
        if self.transforms.hooks is not None:
            self.transforms.hooks.bind(ctx)
        return ctx

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
        **family_inputs,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` (or ``[T, V]`` for a 1-D packed row); final hidden states if ``return_hidden``.

        Packed: ``input_ids`` ``[T]`` / ``[1, T]`` (or ``[B, S]`` flattened) with ``cu_seqlens``
        ``[0, l1, l1+l2, ..., T]``; positions restart in every document and no token sees another
        document. Padded: ``attention_mask`` ``[B, S]``; each row equals its unpadded self.
        ``inputs_embeds`` are used as given (not scaled again). ``cache``: a ``KVCache`` for
        incremental decoding, or a context-parallel key exchange (``gemmaforge.parallel.cp``).

        Multimodal prefixes: ``extra_embeds`` ``[B, N, hidden]`` (``[N, hidden]`` for a 1-D row)
        replace the token embeddings at ``extra_positions`` ``[B, N]`` (``[N]``). Scaling rule: text
        tokens go through the scaled embedding (Gemma: ``* sqrt(hidden)``) exactly once; spliced
        features are used AS GIVEN, never scaled, so an encoder/projector must produce vectors at
        the scale of scaled token embeddings (``gemmaforge.multimodal.Projector`` learns it).

        ``mm_groups`` ``[B, S]`` (``[T]`` packed): -1 for text, one id ``>= 0`` per image; the
        tokens of one image attend to each other bidirectionally (Gemma 3: every layer; Gemma 4:
        sliding layers), within their document. ``gemmaforge.multimodal.group_ids_from_token_types``
        builds it from the reference's ``token_type_ids``.

        ``family_inputs``: inputs only one family takes (Gemma 4: ``per_layer_inputs``), and media
        (``pixel_values``, ``audio_features``... as the model's ``media_specs`` name them): each
        modality is encoded and its features replace its placeholder tokens of ``input_ids``, in
        order; the tokens of one image then attend to each other (``mm_groups`` derived from the
        placeholders unless given). See ``models.common.media``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        lead = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        packed = cu_seqlens is not None
        media = split_media(self, family_inputs)
        ids = None
        if input_ids is not None:
            if self.model.embed_tokens is None:
                raise InputError("this model part has no token embedding (a later pipeline stage): pass inputs_embeds")
            self.check_ids(input_ids)
            ids = input_ids.reshape(1, -1) if (input_ids.dim() == 1 or packed) else input_ids
            h = self.embed(ids)
        else:
            h = inputs_embeds.reshape(1, -1, inputs_embeds.shape[-1]) if (
                inputs_embeds.dim() == 2 or packed) else inputs_embeds
        if media:
            h, groups = place_media(self, h, ids, media)
            if mm_groups is None and groups is not None:
                mm_groups = groups
        if extra_embeds is not None:
            h = splice_embeds(h, extra_embeds, extra_positions)
        B, S, _ = h.shape
        ctx = self.make_context(B, S, h.device, h.dtype, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                attention_mask=attention_mask, cache=cache, attn_backend=attn_backend,
                                mm_groups=mm_groups)
        h = ctx.hook(None, "hook_embed", h)
        self.prepare(h, ctx, ids, **family_inputs)
        for layer in self.model.layers.values():
            h = layer(h, ctx)
        if cache is not None:
            cache.advance(S)
        if self.model.norm is not None:
            h = ctx.hook(None, "ln_final.hook_normalized", self.model.norm(h))
        out = h if (return_hidden or self.lm_head is None) else ctx.hook(None, "hook_logits", self.logits(h))
        return out.reshape(*lead, out.shape[-1])

    # ---- interpretability (the machinery lives in models/common/hooks.py) ----
    def run_with_cache(self, input_ids=None, names_filter=None, **forward_kwargs):
        """``(logits, cache)`` with TransformerLens hook names; ``cache["resid_post", i]`` works."""
        from .hooks import run_with_cache

        return run_with_cache(self, input_ids, names_filter, **forward_kwargs)

    def run_with_hooks(self, input_ids=None, fwd_hooks=(), **forward_kwargs):
        """``fwd_hooks=[(name_or_predicate, fn)]``; ``fn(tensor, hook)`` may return a replacement."""
        from .hooks import run_with_hooks

        return run_with_hooks(self, input_ids, fwd_hooks, **forward_kwargs)

    def hooks(self, fwd_hooks=(), cache=None, names_filter=None):
        """Context manager attaching hooks to every forward inside it."""
        from .hooks import hooks

        return hooks(self, list(fwd_hooks), cache=cache, names_filter=names_filter)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache([self.config.window_for(t) for t in self.config.layer_types], max_len)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
