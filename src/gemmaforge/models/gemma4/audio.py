"""Gemma 4 audio tower (``Gemma4AudioModel``, a USM-style conformer), as transformers 5.23 defines it.

From log-mel features ``[B, T, 128]`` (``data.audio.Gemma4AudioFeatureExtractor``; 10 ms hop) and
their mask ``[B, T]`` (True = real audio) to soft tokens ``[B, T/4, output_proj_dims]``:
- subsampling: two Conv2d (3x3, stride 2, no bias) over (time, mel), each followed by a LayerNorm
  over channels (no bias) and ReLU; padded frames are zeroed before each conv and the mask keeps
  every second frame; the (channels x mel/4) result is projected to ``hidden_size``: 40 ms per token;
- every conformer layer: ``ffw(x)`` (macaron, half-weighted residual), chunked local self-attention,
  a light depthwise causal conv block, a second ``ffw``, a final norm; activations are clamped to
  ``+-gradient_clipping`` around every norm (a no-op at the default 1e10);
- attention: queries in chunks of ``attention_chunk_size``, each seeing ``attention_context_left - 1``
  frames back and ``attention_context_right`` ahead (Transformer-XL relative positions: sinusoids
  through ``relative_k_proj``, then the "rel shift"); per-dimension query scale
  ``softplus(per_dim_scale) * head_dim^-0.5 / ln 2``, key scale ``ln(1 + e) / ln 2``; logits
  softcapped at ``attention_logit_cap``; masked logits set to ``attention_invalid_logits_value``;
- ``output_proj`` (with bias) to ``output_proj_dims``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, InputError
from ...layers.mlp import ACTIVATIONS
from ...layers.norm import RMSNorm
from .vision import ClippableLinear


@dataclass
class Gemma4AudioConfig:
    """``Gemma4AudioConfig``; defaults are the E2B/E4B tower (transformers' defaults)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: list[int] = field(default_factory=lambda: [128, 32])
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    model_type = "gemma4_audio"

    def __post_init__(self):
        self.subsampling_conv_channels = list(self.subsampling_conv_channels)
        if len(self.subsampling_conv_channels) != 2:
            raise ConfigError("audio_config: subsampling_conv_channels must have two entries")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"audio_config: hidden_size ({self.hidden_size}) is not a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"audio_config: hidden_act {self.hidden_act!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> dict:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "hidden_act": self.hidden_act,
            "subsampling_conv_channels": list(self.subsampling_conv_channels),
            "conv_kernel_size": self.conv_kernel_size,
            "residual_weight": self.residual_weight,
            "attention_chunk_size": self.attention_chunk_size,
            "attention_context_left": self.attention_context_left,
            "attention_context_right": self.attention_context_right,
            "attention_logit_cap": self.attention_logit_cap,
            "attention_invalid_logits_value": self.attention_invalid_logits_value,
            "use_clipped_linears": self.use_clipped_linears,
            "rms_norm_eps": self.rms_norm_eps,
            "gradient_clipping": self.gradient_clipping,
            "output_proj_dims": self.output_proj_dims,
        }

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json: audio_config") -> "Gemma4AudioConfig":
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: bad value ({e})") from None


AUDIO_PRESETS: dict[str, dict] = {
    "gemma-4-e2b": {},  # 1024 wide, 12 layers, 8 heads, 1536 output
    "gemma-4-e4b": {},
    # takes 16 mel bins (the tower's input width is subsampling_conv_channels[0], see below)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 4],
                 conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, attention_context_right=0,
                 output_proj_dims=24),
}


def _clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    limit = min(limit, torch.finfo(x.dtype).max)  # the default 1e10 overflows fp16
    return torch.clamp(x, -limit, limit)


class Gemma4AudioSubSampleConvProjectionLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=(3, 3), stride=(2, 2), padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, elementwise_affine=True, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        x = self.conv((x * mask[:, None, :, None]).to(self.conv.weight.dtype))  # (B, C, T/2, F/2)
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return x, mask[:, ::2]


class Gemma4AudioSubSampleConvProjection(nn.Module):
    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = Gemma4AudioSubSampleConvProjectionLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = Gemma4AudioSubSampleConvProjectionLayer(c0, c1, cfg.rms_norm_eps)
        # (mel / 4) * c1 inputs; the reference sizes it from c0, so the tower takes c0 mel bins (128)
        self.mel_bins = c0
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, cfg.hidden_size, bias=False)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor):
        if feats.shape[-1] != self.mel_bins:
            raise InputError(f"audio features have {feats.shape[-1]} mel bins; this tower takes {self.mel_bins}")
        x, mask = self.layer0(feats.unsqueeze(1), mask)
        x, mask = self.layer1(x, mask)
        B, _, T, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(B, T, -1)), mask  # (B, T/4, hidden)


class Gemma4AudioFeedForward(nn.Module):
    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        h, c = cfg.hidden_size, cfg.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, c)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, c)
        self.pre_layer_norm = RMSNorm(h)  # eps 1e-6 in the reference whatever the config says
        self.post_layer_norm = RMSNorm(h)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.clip = cfg.gradient_clipping
        self.post_layer_scale = cfg.residual_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre_layer_norm(_clamp(x, self.clip))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        return x + self.post_layer_norm(_clamp(y, self.clip)) * self.post_layer_scale


class Gemma4AudioCausalConv1d(nn.Conv1d):
    """Depthwise conv over time, left-padded so frame t sees frames t-k+1..t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = (self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0]
        return super().forward(F.pad(x, (left, 0)))


class Gemma4AudioLightConv1d(nn.Module):
    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        h, c = cfg.hidden_size, cfg.use_clipped_linears
        self.linear_start = ClippableLinear(h, 2 * h, c)
        self.linear_end = ClippableLinear(h, h, c)
        self.depthwise_conv1d = Gemma4AudioCausalConv1d(h, h, kernel_size=cfg.conv_kernel_size, groups=h, bias=False)
        self.pre_layer_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.clip = cfg.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        y = self.depthwise_conv1d(y.transpose(1, 2)).transpose(1, 2)  # (B, T, hidden)
        y = self.act(self.conv_norm(_clamp(y, self.clip)))
        return x + self.linear_end(y)


def relative_positions(cfg: Gemma4AudioConfig, device, dtype) -> torch.Tensor:
    """Sinusoids ``[context/2 + 1, hidden]`` for relative distances context/2 .. 0 ([sin..., cos...])."""
    context = cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right
    n = cfg.hidden_size // 2
    inv = torch.exp(torch.arange(n, device=device) * -(math.log(10_000.0) / max(n - 1, 1)))
    t = torch.arange(context // 2, -1, -1, device=device)[:, None] * inv[None, None]  # (1, P, n)
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)[0].to(dtype)


class Gemma4AudioAttention(nn.Module):
    """Chunked local attention with Transformer-XL relative position logits."""

    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        h, c = cfg.hidden_size, cfg.use_clipped_linears
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_scale = self.head_dim ** -0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.chunk = cfg.attention_chunk_size
        self.past = cfg.attention_context_left - 1
        self.future = cfg.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap = cfg.attention_logit_cap
        self.invalid = cfg.attention_invalid_logits_value
        self.q_proj = ClippableLinear(h, h, c)
        self.k_proj = ClippableLinear(h, h, c)
        self.v_proj = ClippableLinear(h, h, c)
        self.post = ClippableLinear(h, h, c)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> non-overlapping query chunks (B, nb, chunk, H, D)."""
        B, T, H, D = x.shape
        nb = -(-T // self.chunk)
        return F.pad(x, (0, 0, 0, 0, 0, nb * self.chunk - T)).reshape(B, nb, self.chunk, H, D)

    def _contexts(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> each chunk's key window (B, nb, context, H, D)."""
        x = F.pad(x, (0, 0, 0, 0, self.past, self.future + self.chunk - 1))
        return torch.movedim(x.unfold(1, self.context, self.chunk), -1, 2)

    def _rel_shift(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, nb, chunk, P) logits per relative distance -> (B, H, nb, chunk, context) per key slot."""
        B, H, nb, c, P = x.shape
        x = F.pad(x, (0, self.context + 1 - P)).reshape(B, H, nb, c * (self.context + 1))
        return x[..., : c * self.context].reshape(B, H, nb, c, self.context)

    def forward(self, x: torch.Tensor, rel_pos: torch.Tensor, blocked_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden]; blocked_mask [B, nb, chunk, context] True = may attend."""
        B, T, _ = x.shape
        shape = (B, T, self.heads, self.head_dim)
        q = self.q_proj(x).float().view(shape) * self.q_scale * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).float().view(shape) * self.k_scale
        v = self.v_proj(x).float().view(shape)
        q = self._blocks(q).permute(0, 3, 1, 2, 4)  # (B, H, nb, chunk, D)
        k = self._contexts(k).permute(0, 3, 1, 4, 2)  # (B, H, nb, D, context)
        v = self._contexts(v).permute(0, 3, 1, 2, 4)  # (B, H, nb, context, D)
        nb = q.shape[2]
        rel = self.relative_k_proj(rel_pos).view(-1, self.heads, self.head_dim).to(q.dtype)  # (P, H, D)
        content = q @ k  # (B, H, nb, chunk, context)
        position = (q.reshape(B, self.heads, -1, self.head_dim) @ rel.permute(1, 2, 0))  # (B, H, nb*chunk, P)
        position = self._rel_shift(position.reshape(B, self.heads, nb, self.chunk, -1))
        logits = torch.tanh((content + position) / self.cap) * self.cap
        logits = logits.masked_fill(~blocked_mask[:, None], self.invalid)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = (probs @ v).permute(0, 2, 3, 1, 4).reshape(B, nb * self.chunk, -1)[:, :T]  # (B, T, hidden)
        return self.post(out.to(x.dtype))


class Gemma4AudioLayer(nn.Module):
    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        h = cfg.hidden_size
        self.feed_forward1 = Gemma4AudioFeedForward(cfg)
        self.feed_forward2 = Gemma4AudioFeedForward(cfg)
        self.self_attn = Gemma4AudioAttention(cfg)
        self.lconv1d = Gemma4AudioLightConv1d(cfg)
        self.norm_pre_attn = RMSNorm(h)
        self.norm_post_attn = RMSNorm(h)
        self.norm_out = RMSNorm(h)
        self.clip = cfg.gradient_clipping

    def forward(self, x: torch.Tensor, rel_pos: torch.Tensor, blocked_mask: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), rel_pos, blocked_mask)
        x = x + self.norm_post_attn(_clamp(a, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class Gemma4AudioModel(nn.Module):
    """Log-mel features ``[B, T, mel]`` + mask ``[B, T]`` -> ``(soft tokens [B, T', output_proj_dims],
    valid [B, T'])``, ``T' = ceil(ceil(T / 2) / 2)``."""

    def __init__(self, cfg: Gemma4AudioConfig):
        super().__init__()
        self.config = cfg
        self.subsample_conv_projection = Gemma4AudioSubSampleConvProjection(cfg)
        self.layers = nn.ModuleList([Gemma4AudioLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.output_proj_dims, bias=True)

    def blocked_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """[B, nb, chunk, context]: query ``n*chunk + c`` may see key ``n*chunk + t - past`` when that key
        is real audio inside the sequence and less than ``past`` frames back / ``future`` ahead."""
        cfg = self.config
        chunk, past, future = cfg.attention_chunk_size, cfg.attention_context_left - 1, cfg.attention_context_right
        B, T = valid.shape
        nb = -(-T // chunk)
        dev = valid.device
        q = torch.arange(nb, device=dev)[:, None, None] * chunk + torch.arange(chunk, device=dev)[None, :, None]
        key = (torch.arange(nb, device=dev)[:, None, None] * chunk
               + torch.arange(chunk + past + future, device=dev)[None, None, :] - past)  # (nb, 1, context)
        inside = (key >= 0) & (key < T) & (q < T)
        # the reference's windows are exclusive: 0 <= q - key < past, 0 < key - q < future
        window = ((q - key >= 0) & (q - key < past)) | ((key - q > 0) & (key - q < future))
        key_valid = valid[:, key.clamp(0, T - 1)]  # (B, nb, 1, context)
        return inside & window & key_valid

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor):
        if input_features.dim() != 3 or input_features_mask.shape != input_features.shape[:2]:
            raise InputError(f"audio features must be [clips, frames, mel] with a mask [clips, frames]; got "
                             f"{tuple(input_features.shape)} and {tuple(input_features_mask.shape)}")
        mask = input_features_mask.to(torch.bool)
        x, valid = self.subsample_conv_projection(input_features, mask)
        rel = relative_positions(self.config, x.device, x.dtype)
        blocked = self.blocked_mask(valid)
        for layer in self.layers:
            x = layer(x, rel, blocked)
        return self.output_proj(x), valid

    def init_buffers(self) -> None:
        for m in self.modules():
            if isinstance(m, ClippableLinear):
                m.init_buffers()
