"""Gemma 3's vision: the SigLIP encoder, the multimodal projector and the whole
``Gemma3ForConditionalGeneration``, as transformers 5.23 defines them.

- SigLIP (``SiglipVisionModel``, no pooling head): a ``patch x patch`` convolution with stride
  ``patch`` (a linear map of each patch), a learned position table (one row per patch of the
  checkpoint's image size), ``num_hidden_layers`` pre-LN encoder layers (LayerNorm -> full
  bidirectional attention with biased q/k/v/out projections and scale ``head_dim ** -0.5`` ->
  residual; LayerNorm -> fc1 -> GELU(tanh) -> fc2 -> residual) and a final LayerNorm.
- Projector (``Gemma3MultiModalProjector``): the ``(image/patch)^2`` patch grid average-pooled to
  ``mm_tokens_per_image`` soft tokens (a square grid), Gemma's RMSNorm ``rms(x) * (1 + w)``
  (eps of the vision config), then ``x @ W`` with ``W`` ``[vision width, text width]``. The result is
  used as given (never scaled by sqrt(hidden)): it replaces the embeddings of the image tokens.
- The whole model keeps the text decoder's parameter names (``model.layers...``) and adds
  ``model.vision_tower`` and ``model.multi_modal_projector`` (transformers' in-memory names under
  ``model.``); ``formats/hf.py`` maps the checkpoint's spellings.

The encoder's training memory is lean by construction: its MLP saves fc1's output only (the GELU is
recomputed in the backward, ``ops.act_linear``), the LayerNorms' outputs are recomputed from their
inputs rather than kept by the projections that read them (``ops.norm_linear``), and attention runs in torch SDPA (its
output is already laid out for ``out_proj``: no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ...layers.mlp import _module_hooked
from ...layers.norm import GemmaRMSNorm
from ...ops import cpu_gemm
from ...ops.act_linear import GeluLinear
from ...ops.norm_linear import LayerNormLinears
from ..common.media import IMAGE, MediaSpec
from .config import Gemma3Config, SiglipVisionConfig
from .model import Gemma3ForCausalLM


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, padding="valid")
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # [N, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, D]
        if x.shape[1] != self.num_patches:
            side = int(self.num_patches ** 0.5) * self.patch_size
            raise InputError(f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels; this vision tower "
                             f"reads {side}x{side} images (resize them with the model's processor)")
        return x + self.position_embedding.weight


def _plain(*mods: nn.Module) -> bool:
    """Training (gradients on) through plain modules (``nn.Linear`` / ``nn.LayerNorm`` or a subclass
    over the same parameters, no LoRA wrapper, sharded weight or hook): the fused ops may read their
    weights directly."""
    return torch.is_grad_enabled() and all(
        isinstance(m, (nn.Linear, nn.LayerNorm)) and type(m.weight.data) is torch.Tensor and not _module_hooked(m)
        for m in mods)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.head_dim = d // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention and ``out_proj`` of projected ``q``, ``k``, ``v`` ``[N, P, width]``."""
        N, P, _ = q.shape
        q = q.view(N, P, -1, self.head_dim).transpose(1, 2)
        k = k.view(N, P, -1, self.head_dim).transpose(1, 2)
        v = v.view(N, P, -1, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # every patch sees every patch
        o = o.transpose(1, 2).reshape(N, P, -1)  # SDPA's output is [N, P, H, d]: a view
        f = self.out_proj
        if _plain(f):
            return cpu_gemm.Linear.apply(o, f.weight, f.bias)  # training: the tower's products through cpu_gemm
        return f(o)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.fc1(x))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """``fc2(gelu(h))`` of fc1's output ``h``."""
        if _plain(self.fc2):
            # saves fc1's output only: GELU(h) (fc2's input) is recomputed in the backward
            return GeluLinear.apply(h, self.fc2.weight, self.fc2.bias, self.approximate)
        return self.fc2(F.gelu(h, approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, n1 = self.self_attn, self.layer_norm1
        if _plain(n1, a.q_proj, a.k_proj, a.v_proj):
            # the norm's output is not kept for q/k/v's weight gradients: recomputed from x in the backward
            q, k, v = LayerNormLinears.apply(x, n1.weight, n1.bias, n1.eps, a.q_proj.weight, a.q_proj.bias,
                                             a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias)
            x = x + a.attend(q, k, v)
        else:
            x = x + a(n1(x))
        m, n2 = self.mlp, self.layer_norm2
        if _plain(n2, m.fc1):
            (h,) = LayerNormLinears.apply(x, n2.weight, n2.bias, n2.eps, m.fc1.weight, m.fc1.bias)
            return x + m.down(h)
        return x + m(n2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class SiglipVisionModel(nn.Module):
    """``pixel_values`` ``[N, C, H, W]`` -> ``[N, patches, width]`` (the last hidden state, post-LN)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Gemma3MultiModalProjector(nn.Module):
    """``[N, patches, vision width]`` -> ``[N, mm_tokens_per_image, text width]``."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        v = cfg.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(v.hidden_size, cfg.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.patches_per_side = v.image_size // v.patch_size
        self.tokens_per_side = int(round(cfg.mm_tokens_per_image ** 0.5))
        self.kernel = self.patches_per_side // self.tokens_per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, D = x.shape
        grid = x.transpose(1, 2).reshape(N, D, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        normed = self.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(x)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The Gemma 3 text decoder with its vision tower and projector (``Gemma3ForConditionalGeneration``).

    ``model(input_ids, pixel_values=...)``: ``pixel_values`` ``[n_images, 3, size, size]`` (the
    processor's), one image per run of ``mm_tokens_per_image`` image tokens, in the order they appear
    (row-major over a padded batch; along the row for packed documents)."""

    VISION_TOWERS = ("model.vision_tower", "model.multi_modal_projector")

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg)
        if cfg.vision_config is None:
            raise ValueError("Gemma3ForConditionalGeneration needs a config with a vision_config")
        self.model.vision_tower = SiglipVisionModel(cfg.vision_config)
        self.model.multi_modal_projector = Gemma3MultiModalProjector(cfg)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n_images, mm_tokens_per_image, hidden]``: what replaces the image tokens."""
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values))

    def media_specs(self) -> list:
        c = self.config
        return [MediaSpec("image", ("pixel_values",), c.image_token_id, IMAGE, True, self.image_features,
                          self.VISION_TOWERS)]

    @staticmethod
    def init_parameter(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
        if name.startswith("model.vision_tower."):
            if "layer_norm" in name or "layernorm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        elif name.startswith("model.multi_modal_projector."):
            if name.endswith("norm.weight"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        else:
            Gemma3ForCausalLM.init_parameter(name, p, std, generator)
