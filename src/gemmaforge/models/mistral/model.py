"""Mistral text decoder (``MistralForCausalLM`` semantics), written for one device.

Llama-style: plain (unscaled) embedding, pre-norm blocks with ``w * rms(x)`` norms (cast to the
input dtype *before* the scale, unlike Gemma), SiLU gated MLP, a single RoPE table, an optional
sliding window on every layer, an untied LM head by default.
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers.embedding import Embedding
from ...layers.head import LMHead
from ...layers.mlp import GatedMLP
from ...layers.norm import RMSNorm
from ..common.blocks import attn_output, rope_cache_attend
from ..common.context import ForwardContext
from ..common.decoder import CausalLM
from .config import MistralConfig


class MistralAttention(nn.Module):
    def __init__(self, cfg: MistralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = cfg.layer_types[layer_idx]
        self.head_dim = d = cfg.head_dim
        self.window = cfg.sliding_window
        self.scale = d ** -0.5
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        out = rope_cache_attend(q, k, v, ctx, layer_idx=self.layer_idx, layer_type=self.layer_type,
                                window=self.window, scale=self.scale)
        return attn_output(self.o_proj, out, ctx, self.layer_idx)


class MistralDecoderLayer(nn.Module):
    def __init__(self, cfg: MistralConfig, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.self_attn = MistralAttention(cfg, layer_idx)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_activation)
        self.input_layernorm = RMSNorm(h, eps, cast_before_scale=True)
        self.post_attention_layernorm = RMSNorm(h, eps, cast_before_scale=True)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        i, hk = self.layer_idx, ctx.hook
        h = hk(i, "hook_resid_pre", h)
        a = self.self_attn(hk(i, "ln1.hook_normalized", self.input_layernorm(hk(i, "hook_attn_in", h))), ctx)
        h = hk(i, "hook_resid_mid", h + hk(i, "hook_attn_out", a))
        m = self.mlp(hk(i, "ln2.hook_normalized", self.post_attention_layernorm(h)), ctx.mlp_hook(i))
        return hk(i, "hook_resid_post", h + hk(i, "hook_mlp_out", m))


class MistralModel(nn.Module):
    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleDict({str(i): MistralDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cast_before_scale=True)


class MistralForCausalLM(CausalLM):
    def __init__(self, cfg: MistralConfig):
        super().__init__(cfg)
        self.model = MistralModel(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_specs(self) -> dict:
        t = self.config.layer_types[0]
        return {t: (self.config.rope[t], self.config.head_dim)}

    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        if "norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)
