"""Gemma 4 text decoder (``Gemma4ForCausalLM`` / the text part of ``Gemma4ForConditionalGeneration``).

Numerics that matter (as transformers 5.23's ``Gemma4TextModel`` computes them):
- every norm is ``rms(x) * w`` in fp32 (identity = 1, NOT Gemma 3's 1+w); V gets a norm without
  weight; attention scale is 1.0 (q_norm/k_norm carry the scale);
- per-layer shapes: full layers have ``global_head_dim`` and, with ``attention_k_eq_v``, no
  ``v_proj`` (V = v_norm(raw k_proj(x)), taken before k_norm and RoPE) and
  ``num_global_key_value_heads``; their RoPE is "proportional" (only the first quarter of the
  frequencies rotate, exponents over the full head_dim);
- KV sharing: the last non-shared layer of each type stores its post-RoPE K and normed V (after
  the KV cache update, with the keys' document ids and stream indices) on the per-forward state;
  the last ``num_kv_shared_layers`` layers read them and own no k/v projections. The store lives on
  the forward's context (``ctx.state["gemma4"]``), which every layer receives by reference;
- per-layer embeddings (PLE): ``(norm(proj(embeds) * hidden^-0.5) + embed_per_layer(ids) * sqrt(P)) * 2^-0.5``,
  added after the MLP of every layer through a gated projection; then ``h *= layer_scalar``;
- final logits ``tanh(z / 30) * 30``.

Multimodal masks: ``mm_groups`` [B, S] (-1 = text, g >= 0 = the tokens of one image) lets the
tokens of one image see each other bidirectionally on sliding layers (full layers stay causal,
as in the reference), within their own document.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import InputError
from ...layers.attention import AttnCall
from ...layers.embedding import ScaledEmbedding
from ...layers.head import LMHead
from ...layers.mlp import ACTIVATIONS, GatedMLP
from ...layers.moe import Gemma4Experts, Gemma4Router
from ...layers.norm import RMSNorm
from ...layers.rope import apply_rope
from ..common.blocks import attend, attn_output, sandwich_attention, sandwich_mlp, sandwich_mlp_out
from ..common.config import SLIDING
from ..common.context import ForwardContext
from ..common.decoder import CausalLM
from .config import SHARE_REUSE, SHARE_STORE, Gemma4Config

STATE = "gemma4"


class Gemma4State:
    """Per-forward state of one Gemma 4 forward, shared by its layers (``ctx.state["gemma4"]``)."""

    def __init__(self, ple: torch.Tensor | None = None):
        self.ple = ple  # [B, S, L, P] combined per-layer inputs, or None (no PLE)
        self.kv: dict[str, tuple] = {}  # layer type -> (k, v, k_doc, k_idx) of its store layer


# ----------------------------------------------------------------------------- layers

class Gemma4Attention(nn.Module):
    def __init__(self, cfg: Gemma4Config, layer_idx: int):
        super().__init__()
        self.layer_idx = i = layer_idx
        self.layer_type = cfg.layer_types[i]
        self.head_dim = d = cfg.layer_head_dim(i)
        self.window = cfg.window_for(self.layer_type)
        self.scale = 1.0  # q_norm / k_norm carry the scale
        self.sharing = cfg.kv_sharing_modes[i]
        self.bidirectional = cfg.use_bidirectional_attention == "vision" and self.layer_type == SLIDING
        h, eps, kv = cfg.hidden_size, cfg.rms_norm_eps, cfg.kv_heads(i)
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.q_norm = RMSNorm(d, eps)
        if self.sharing != SHARE_REUSE:  # reuse layers read the store layer's K/V: no k/v weights
            self.k_proj = nn.Linear(h, kv * d, bias=False)
            self.v_proj = None if cfg.k_eq_v(i) else nn.Linear(h, kv * d, bias=False)
            self.k_norm = RMSNorm(d, eps)
            self.v_norm = RMSNorm(d, eps, with_scale=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x.shape
        i, hk, d = self.layer_idx, ctx.hook, self.head_dim
        state: Gemma4State = ctx.state[STATE]
        cos, sin = ctx.rope[self.layer_type]
        # -1 heads: tensor parallelism shards the projections without touching this code
        q = self.q_norm(self.q_proj(x).view(B, S, -1, d)).transpose(1, 2)  # (B, H, S, D)
        q = hk(i, "attn.hook_q", q, "bhsd")
        q = hk(i, "attn.hook_rot_q", apply_rope(q, cos, sin), "bhsd")
        if self.sharing == SHARE_REUSE:
            k, v, k_doc, k_idx = state.kv[self.layer_type]
        else:
            k_raw = self.k_proj(x).view(B, S, -1, d)  # (B, S, Hkv, D)
            v = k_raw if self.v_proj is None else self.v_proj(x).view(B, S, -1, d)  # K=V: raw k_proj output
            k = hk(i, "attn.hook_k", self.k_norm(k_raw).transpose(1, 2), "bhsd")  # (B, Hkv, S, D)
            v = hk(i, "attn.hook_v", self.v_norm(v).transpose(1, 2), "bhsd")
            k = hk(i, "attn.hook_rot_k", apply_rope(k, cos, sin), "bhsd")
            k_doc, k_idx = ctx.info.doc, ctx.info.idx
            if ctx.cache is not None:
                k, v, k_doc, k_idx = ctx.cache.update(i, k, v, k_doc, k_idx)
            if self.sharing == SHARE_STORE:
                state.kv[self.layer_type] = (k, v, k_doc, k_idx)
        own = ctx.cache is None or (k_idx is ctx.info.idx and k_doc is ctx.info.doc)  # keys = this call's tokens
        call = AttnCall(ctx.info, k_doc, k_idx, self.window, self.scale, None, own,
                        bidirectional_groups=self.bidirectional)
        return attn_output(self.o_proj, attend(q, k, v, ctx, call, i), ctx, i)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4Config, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = layer_idx
        self.self_attn = Gemma4Attention(cfg, layer_idx)
        # a KV-sharing reuse layer computes no keys/values: no k/v hook points (models/common/hooks.py)
        self.absent_hook_points = frozenset({"attn.hook_k", "attn.hook_v", "attn.hook_rot_k"}) \
            if cfg.kv_sharing_modes[layer_idx] == SHARE_REUSE else frozenset()
        self.mlp = GatedMLP(h, cfg.mlp_size(layer_idx), cfg.hidden_activation)  # double-wide on reuse layers
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: checkpoints carry it
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Gemma4Router(h, cfg.num_experts, cfg.top_k_experts, eps)
            self.experts = Gemma4Experts(cfg.num_experts, h, cfg.moe_intermediate_size, cfg.hidden_activation)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.ple = cfg.hidden_size_per_layer_input
        if self.ple:
            self.act = ACTIVATIONS[cfg.hidden_activation]
            self.per_layer_input_gate = nn.Linear(h, self.ple, bias=False)
            self.per_layer_projection = nn.Linear(self.ple, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # hook sites carry TransformerLens names; with no hooks each is one cheap call returning its input
        i, hk = self.layer_idx, ctx.hook
        h = sandwich_attention(self, h, ctx)
        m = sandwich_mlp(self, h, ctx)
        if self.moe:
            # dense MLP and experts side by side; the router and the experts read the residual h
            flat = h.reshape(-1, h.shape[-1])  # (B*S, hidden)
            _, weights, index = self.router(flat)
            e = self.experts(self.pre_feedforward_layernorm_2(flat), index, weights).reshape(h.shape)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)
        h = h + sandwich_mlp_out(self, m, ctx)
        if self.ple:
            p = ctx.state[STATE].ple[:, :, i, :]  # (B, S, P)
            g = self.act(self.per_layer_input_gate(h)) * p
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        h = h * self.layer_scalar
        return hk(i, "hook_resid_post", h)


class Gemma4Model(nn.Module):
    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id, cfg.embed_scale)
        # ModuleDict keyed by str(i): parameter names survive pipeline splits
        self.layers = nn.ModuleDict({str(i): Gemma4DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        P, L = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
        if P:
            self.embed_tokens_per_layer = ScaledEmbedding(cfg.vocab_size_per_layer_input, L * P, cfg.pad_token_id,
                                                          math.sqrt(P))
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)


class Gemma4ForCausalLM(CausalLM):
    supports_mm_groups = True  # image tokens attend bidirectionally on sliding layers ("vision" configs)

    def __init__(self, cfg: Gemma4Config):
        super().__init__(cfg)
        self.model = Gemma4Model(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # tied to the UNSCALED embedding

    # ---- inputs ----
    def _llm_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        mm = self.config.mm_token_ids
        if not mm:
            return input_ids
        # multimodal checkpoints embed image/video/audio placeholders as the pad token (reference)
        is_mm = torch.isin(input_ids, torch.tensor(mm, device=input_ids.device))
        return torch.where(is_mm, self.config.pad_token_id, input_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(self._llm_ids(input_ids))

    def prepare(self, h: torch.Tensor, ctx: ForwardContext, input_ids: torch.Tensor | None,
                per_layer_inputs: torch.Tensor | None = None) -> None:
        """The per-layer inputs (PLE) of this forward and an empty KV-sharing store, on ``ctx.state``.

        ``per_layer_inputs``: the token part of PLE ``[B, S, L, P]`` (needed with ``inputs_embeds``
        unless those are exact rows of the scaled embedding, which are then looked up).
        """
        cfg = self.config
        B, S = h.shape[:2]
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        if per_layer_inputs is not None:
            if not P:
                raise InputError("per_layer_inputs given but this model has no per-layer embeddings")
            if per_layer_inputs.numel() != B * S * L * P:
                raise InputError(f"per_layer_inputs must be [B, S, {L}, {P}] with B*S = {B * S}; got shape "
                                 f"{tuple(per_layer_inputs.shape)}")
        ple = None
        if P:
            if per_layer_inputs is not None:
                tokens = per_layer_inputs.reshape(B, S, L, P).to(h.dtype)
            else:
                tokens = self._per_layer_tokens(None if input_ids is None else self._llm_ids(input_ids), h)
            ctx_part = self.model.per_layer_model_projection(h) * cfg.hidden_size ** -0.5
            ctx_part = self.model.per_layer_projection_norm(ctx_part.reshape(B, S, L, P))  # (B, S, L, P)
            ple = (ctx_part + tokens) * 2.0 ** -0.5
        ctx.state[STATE] = Gemma4State(ple)

    def _per_layer_tokens(self, ids: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, S = h.shape[:2]
        if ids is None:
            # only embeddings were given: find their ids as the reference does (exact rows of the scaled table)
            with torch.no_grad():
                table = self.model.embed_tokens.table() * cfg.hidden_size ** 0.5
                match = (h[:, :, None, :] == table[None, None]).all(-1)  # (B, S, V)
                found = match.any(-1)
                if not bool(found.all()):
                    raise InputError("inputs_embeds are not exact rows of the scaled embedding, so the per-layer "
                                     "embeddings cannot be looked up; pass per_layer_inputs as well")
                ids = match.float().argmax(-1)
        return self.model.embed_tokens_per_layer(ids).reshape(B, S, cfg.num_hidden_layers,
                                                              cfg.hidden_size_per_layer_input)

    # ---- family pieces ----
    def rope_specs(self) -> dict:
        used = set(self.config.layer_types)
        return {t: (spec, self.config.head_dim_for(t)) for t, spec in self.config.rope.items() if t in used}

    def ignored_checkpoint_keys(self, keys) -> set[str]:
        """Checkpoint tensors that belong to no parameter here: the k/v projections and norms some
        exports keep for KV-sharing layers (the reference ignores them on load too)."""
        out = set()
        for i, mode in enumerate(self.config.kv_sharing_modes):
            if mode == SHARE_REUSE:
                pre = f"model.layers.{i}.self_attn."
                out |= {k for k in keys if k.startswith(pre) and k[len(pre):].split(".")[0] in
                        ("k_proj", "v_proj", "k_norm", "v_norm")}
        return out

    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        """Random init as the reference does: normal(0, std) matrices and embeddings, ones for norms and
        router scales."""
        if p.dim() == 1:  # norms, router.scale, router.per_expert_scale
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, 0.0, std, generator=generator)

    def init_buffers(self) -> None:
        for name, b in self.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)

