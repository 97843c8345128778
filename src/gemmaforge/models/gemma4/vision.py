"""Gemma 4 vision tower (``Gemma4VisionModel``) and the embedder into the text model
(``Gemma4MultimodalEmbedder``), as transformers 5.23 defines them.

What is particular to this tower:
- inputs are patches, not pixels: ``pixel_values`` ``[N_img, max_patches, 3 * p * p]`` in [0, 1]
  (the image processor resizes each image to a multiple of ``pooling_kernel_size * patch_size``
  keeping its aspect ratio, cuts it into patches and pads to ``max_patches``) and
  ``image_position_ids`` ``[N_img, max_patches, 2]``: each patch's (x, y) in the patch grid,
  (-1, -1) for padding. The tower maps pixels to [-1, 1] itself (``2 * (p - 0.5)``);
- positions are 2-D twice over: a learned additive table per axis (``position_embedding_table``
  ``[2, P, hidden]``: x row + y row) on the patch embeddings, and an axial RoPE in every layer (the
  first half of each head's dims rotates by x, the second half by y; theta 100);
- the layers are Gemma 4's sandwich blocks (q/k norms with weights, v norm without, attention
  scale 1.0), bidirectional over the image's own patches (padding patches are masked as keys);
- pooling averages each ``k x k`` block of the patch grid (``k = pooling_kernel_size``) into one
  soft token, then multiplies by ``sqrt(hidden)`` (in fp32); padding soft tokens are dropped, so
  the output is ``[sum of soft tokens over images, hidden]``; optionally standardised
  (``(x - std_bias) * std_scale``, the 26B/31B towers);
- linear layers may clamp their inputs and outputs to ranges stored in the checkpoint
  (``use_clipped_linears``: ``input_min``/``input_max``/``output_min``/``output_max`` buffers).

The embedder is ``embedding_projection(rms(x))`` (a norm without weight): no sqrt(hidden) is applied
afterwards, the features are spliced into the text embeddings as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, InputError
from ...layers.mlp import ACTIVATIONS
from ...layers.norm import RMSNorm
from ...layers.rope import rotate_half


@dataclass
class Gemma4VisionConfig:
    """``Gemma4VisionConfig``; defaults are the E2B/E4B tower (transformers' defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    model_type = "gemma4_vision"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config: head_dim ({self.head_dim}) must be a multiple of 4 (2-D rotary)")
        if self.hidden_activation not in ACTIVATIONS:
            raise ConfigError(f"vision_config: hidden_activation {self.hidden_activation!r} is not supported")

    def to_hf(self) -> dict:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_activation,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "pooling_kernel_size": self.pooling_kernel_size,
            "patch_size": self.patch_size,
            "position_embedding_size": self.position_embedding_size,
            "use_clipped_linears": self.use_clipped_linears,
            "standardize": self.standardize,
            "attention_bias": False,
            "attention_dropout": 0.0,
        }

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json: vision_config") -> "Gemma4VisionConfig":
        if d.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not a Gemma 4 vision tower")
        rp = d.get("rope_parameters") or {}
        try:
            heads = int(d.get("num_attention_heads", 12))
            return cls(
                hidden_size=int(d.get("hidden_size", 768)),
                intermediate_size=int(d.get("intermediate_size", 3072)),
                num_hidden_layers=int(d.get("num_hidden_layers", 16)),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or 64),
                hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rp.get("rope_theta", 100.0)),
                pooling_kernel_size=int(d.get("pooling_kernel_size", 3)),
                patch_size=int(d.get("patch_size", 16)),
                position_embedding_size=int(d.get("position_embedding_size", 10 * 1024)),
                use_clipped_linears=bool(d.get("use_clipped_linears", False)),
                standardize=bool(d.get("standardize", False)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: bad value ({e})") from None


# presets of the released towers (read from the published configs) and a tiny debug tower
VISION_PRESETS: dict[str, dict] = {
    "gemma-4-e2b": {},  # 768 wide, 16 layers, 12 heads of 64
    "gemma-4-e4b": {},
    "gemma-4-26b-a4b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            num_key_value_heads=16, head_dim=72, standardize=True),
    "gemma-4-31b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, head_dim=72, standardize=True),
    "tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=64),
}


# ----------------------------------------------------------------------------- building blocks

class ClippableLinear(nn.Module):
    """``nn.Linear`` without bias under ``.linear`` (the checkpoint's names); with ``clipped`` its input
    and output are clamped to the ranges the checkpoint stores (persistent buffers, +-inf at init)."""

    def __init__(self, d_in: int, d_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.clipped = clipped
        if clipped:
            for name, v in (("input_min", -math.inf), ("input_max", math.inf),
                            ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)

    def init_buffers(self) -> None:
        if self.clipped:
            self.input_min.fill_(-math.inf)
            self.output_min.fill_(-math.inf)
            self.input_max.fill_(math.inf)
            self.output_max.fill_(math.inf)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """2-D rotary: the first half of the head dims rotates by x, the second by y (each half-split).
    x: [B, H, N, D]; cos/sin: [B, N, D] laid out (x, x, y, y) in quarters."""
    xs = x.chunk(2, dim=-1)
    cs, ss = cos.unsqueeze(1).chunk(2, dim=-1), sin.unsqueeze(1).chunk(2, dim=-1)
    return torch.cat([p * c + rotate_half(p) * s for p, c, s in zip(xs, cs, ss)], dim=-1)


def axial_rope_table(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[B, N, head_dim]`` for patch positions ``[B, N, 2]`` (fp32, cast to ``dtype``)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=positions.device) / spatial))
    f = positions[..., None].float() * inv_freq  # (B, N, 2, spatial/2)
    fx, fy = f[:, :, 0], f[:, :, 1]
    emb = torch.cat([fx, fx, fy, fy], dim=-1)  # (B, N, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Gemma4VisionAttention(nn.Module):
    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        h, d, c = cfg.hidden_size, cfg.head_dim, cfg.use_clipped_linears
        self.head_dim = d
        self.q_proj = ClippableLinear(h, cfg.num_attention_heads * d, c)
        self.k_proj = ClippableLinear(h, cfg.num_key_value_heads * d, c)
        self.v_proj = ClippableLinear(h, cfg.num_key_value_heads * d, c)
        self.o_proj = ClippableLinear(cfg.num_attention_heads * d, h, c)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = x.shape
        d = self.head_dim
        cos, sin = rope
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(B, N, -1, d)).transpose(1, 2), cos, sin)  # (B, H, N, D)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(B, N, -1, d)).transpose(1, 2), cos, sin)  # (B, Hkv, N, D)
        v = self.v_norm(self.v_proj(x).view(B, N, -1, d)).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # padding patches are not keys
        # scale 1.0: q_norm / k_norm carry the scale
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


class Gemma4VisionMLP(nn.Module):
    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        h, i, c = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, c)
        self.up_proj = ClippableLinear(h, i, c)
        self.down_proj = ClippableLinear(i, h, c)
        self.act = ACTIVATIONS[cfg.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma4VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma4VisionAttention(cfg)
        self.mlp = Gemma4VisionMLP(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, h: torch.Tensor, rope, key_mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, key_mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma4VisionPatchEmbedder(nn.Module):
    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        # the tower was trained on pixels in [-1, 1]; the processor gives [0, 1]
        h = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))  # (B, N, hidden)
        pos = positions.clamp(min=0)  # padding (-1) looks up row 0, then is zeroed
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])
        return h + torch.where(padding[..., None], 0.0, pe)


class Gemma4VisionEncoder(nn.Module):
    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Gemma4VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


def pool_patches(h: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor, length: int):
    """Average each ``k x k`` block of every image's patch grid into one soft token, ``k`` from the
    ratio of patches to ``length``; returns ``(pooled [B, length, hidden] fp32, valid [B, length])``.

    Soft token ``(x // k) + (W // k) * (y // k)`` (W: the image's grid width) collects its patches with
    weight ``1 / k^2``; the image's soft tokens come first, the rest are padding."""
    B, N, _ = h.shape
    h = h.masked_fill(padding[..., None], 0.0)
    if N == length:
        return h.float(), ~padding
    k = int((N // length) ** 0.5)
    if k * k * length != N:
        raise InputError(f"cannot pool {N} patches into {length} soft tokens (needs k^2 * {length} patches)")
    pos = positions.clamp(min=0)
    width = pos[..., 0].max(dim=-1, keepdim=True)[0] + 1  # (B, 1) grid width of each image
    cell = torch.div(pos, k, rounding_mode="floor")
    cell = cell[..., 0] + (width // k) * cell[..., 1]  # (B, N) soft token of each patch
    weights = F.one_hot(cell.long(), length).float() / (k * k)  # (B, N, length)
    pooled = weights.transpose(1, 2) @ h.float()  # (B, length, hidden)
    valid = ~(weights == 0).all(dim=1)
    return pooled.to(h.dtype), valid


class Gemma4VisionModel(nn.Module):
    """Patches -> soft tokens ``[sum over images of their soft tokens, hidden]`` (fp32 unless the tower is
    in another dtype), plus the count per image."""

    def __init__(self, cfg: Gemma4VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedder = Gemma4VisionPatchEmbedder(cfg)
        self.encoder = Gemma4VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor):
        cfg = self.config
        if pixel_values.dim() != 3 or image_position_ids.shape != (*pixel_values.shape[:2], 2):
            raise InputError(f"pixel_values must be [images, patches, 3*{cfg.patch_size}^2] with image_position_ids "
                             f"[images, patches, 2]; got {tuple(pixel_values.shape)} and "
                             f"{tuple(image_position_ids.shape)}")
        if pixel_values.shape[-1] != 3 * cfg.patch_size ** 2:
            raise InputError(f"pixel_values: patches of {pixel_values.shape[-1]} values, this tower takes "
                             f"3 * {cfg.patch_size}^2 = {3 * cfg.patch_size ** 2}")
        k2 = cfg.pooling_kernel_size ** 2
        length = pixel_values.shape[1] // k2
        padding = (image_position_ids == -1).all(dim=-1)  # (B, N)
        h = self.patch_embedder(pixel_values, image_position_ids, padding)
        rope = axial_rope_table(image_position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        key_mask = None if not bool(padding.any()) else ~padding
        for layer in self.encoder.layers:
            h = layer(h, rope, key_mask)
        pooled, valid = pool_patches(h, image_position_ids, padding, length)
        # sqrt(hidden) in fp32: the scaled activations can leave the fp16 range
        feats = pooled.float()[valid] * cfg.hidden_size ** 0.5  # (sum of soft tokens, hidden)
        if cfg.standardize:
            feats = (feats - self.std_bias.float()) * self.std_scale.float()
        return feats.to(h.dtype), valid.sum(-1)

    def init_buffers(self) -> None:
        if self.config.standardize:
            self.std_bias.zero_()
            self.std_scale.fill_(1.0)
        for m in self.modules():
            if isinstance(m, ClippableLinear):
                m.init_buffers()


class Gemma4MultimodalEmbedder(nn.Module):
    """A tower's soft tokens -> the text model's width: ``embedding_projection(rms(x))`` (no norm weight)."""

    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(d_in, eps, with_scale=False)
        self.embedding_projection = nn.Linear(d_in, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
