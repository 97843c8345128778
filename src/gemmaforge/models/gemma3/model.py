"""Gemma 3 text decoder (``Gemma3ForCausalLM`` semantics), written for one device.

Numerics that matter (as transformers 5.23's ``Gemma3TextModel`` computes them):
- embeddings are scaled by sqrt(hidden) with the scale cast to the weight dtype first
  (bf16: sqrt(640) = 25.30 becomes 25.25); the LM head is tied to the *unscaled* weight;
- every norm is ``rms(x) * (1 + w)`` in fp32; sandwich norms around attention and MLP;
- q/k get a per-head norm BEFORE RoPE; V gets none;
- attention scale is ``query_pre_attn_scalar ** -0.5`` (not head_dim ** -0.5 on 27B);
- dual RoPE: each layer uses the table of its own type (sliding theta 10k, full theta 1M with
  linear scaling on 4B+), and sliding layers see ``w`` keys including themselves.

Multimodal masks: ``mm_groups`` [B, S] (-1 = text, g >= 0 = the tokens of one image) lets the
tokens of one image see each other bidirectionally on EVERY layer, within their own document, as
``Gemma3ForConditionalGeneration`` does with ``token_type_ids``; sliding layers keep their
one-sided window (``q - k < w``), so a later token of the same image stays visible.

Parallelism, activation checkpointing, LoRA and hooks are applied from outside (parallel/,
adapters/, models/common/hooks.py); parameter names equal HF's so checkpoint conversion is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers.embedding import ScaledEmbedding
from ...layers.head import LMHead
from ...layers.mlp import GatedMLP
from ...layers.norm import GemmaRMSNorm
from ..common.blocks import attn_output, rope_cache_attend, sandwich_attention, sandwich_mlp, sandwich_mlp_out
from ..common.context import ForwardContext
from ..common.decoder import CausalLM
from .config import Gemma3Config


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = cfg.layer_types[layer_idx]
        self.head_dim = d = cfg.head_dim
        self.window = cfg.window_for(self.layer_type)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        # transformers' Gemma3Attention never hands attn_logit_softcapping to its attention kernel
        # (Gemma 2 did), so in Gemma 3 checkpoints the value is inert; we match the reference.
        self.softcap = None
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        self.q_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: tensor parallelism shards the projections without touching this code
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = rope_cache_attend(q, k, v, ctx, layer_idx=self.layer_idx, layer_type=self.layer_type,
                                window=self.window, scale=self.scale, softcap=self.softcap,
                                bidirectional_groups=True)
        return attn_output(self.o_proj, out, ctx, self.layer_idx)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # hook sites carry TransformerLens names; with no hooks each is one cheap call returning its input
        h = sandwich_attention(self, h, ctx)
        m = sandwich_mlp_out(self, sandwich_mlp(self, h, ctx), ctx)
        return ctx.hook(self.layer_idx, "hook_resid_post", h + m)


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id, cfg.embed_scale)
        # ModuleDict keyed by str(i): parameter names survive pipeline splits
        self.layers = nn.ModuleDict({str(i): Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma3ForCausalLM(CausalLM):
    supports_mm_groups = True  # image tokens attend bidirectionally on every layer

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg)
        self.model = Gemma3Model(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # tied to the UNSCALED embedding

    def rope_specs(self) -> dict:
        used = set(self.config.layer_types)
        return {t: (spec, self.config.head_dim) for t, spec in self.config.rope.items() if t in used}

    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        """Random init as the reference does: normal(0, std) linears/embedding, zero (identity) norms."""
        if name.endswith("norm.weight") or "layernorm" in name:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)
