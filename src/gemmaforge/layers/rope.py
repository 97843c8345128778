"""Rotary position embeddings: per-layer-type tables, half-split (``rotate_half``) layout.

Gemma 3 has two tables (sliding layers theta 10k, full layers theta 1M with optional linear
scaling); every layer reads the table of its own type. Tables are computed once per forward
from the positions and shared by all layers of a type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class RopeSpec:
    """Rotary table of one layer type.

    ``rope_type``: "default", "linear" (positions divided by ``factor``, i.e. inv_freq / factor)
    or "proportional" (Gemma 4 full layers: only the first ``partial_rotary_factor`` of the
    frequencies rotate, with exponents over the full head_dim).
    """

    theta: float = 10_000.0
    rope_type: str = "default"
    factor: float = 1.0
    partial_rotary_factor: float = 1.0

    def to_hf(self) -> dict:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "linear":
            d["factor"] = self.factor
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        return d

    @classmethod
    def from_hf(cls, d: dict, default_theta: float, where: str) -> "RopeSpec":
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ("default", "linear", "proportional"):
            raise ConfigError(f"{where}: unsupported rope_type {rope_type!r} (supported: default, linear, proportional)")
        return cls(
            theta=float(d.get("rope_theta", default_theta)),
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            partial_rotary_factor=float(d.get("partial_rotary_factor", 1.0)),
        )


def inv_freq(spec: RopeSpec, head_dim: int, device=None) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/head_dim)`` for one layer type (fp32, [head_dim/2])."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim
    freq = 1.0 / (spec.theta ** exps)
    if spec.rope_type == "linear":
        freq = freq / spec.factor
    elif spec.rope_type == "proportional":
        # Gemma 4 full layers: only the first partial_rotary_factor of the frequencies rotate;
        # exponents stay over the FULL head_dim, the rest are 0 (identity rotation).
        n_rot = int(spec.partial_rotary_factor * head_dim) // 2
        freq = torch.cat([freq[:n_rot], torch.zeros(head_dim // 2 - n_rot, device=device)])
        if spec.factor != 1.0:
            freq = freq / spec.factor
    return freq


def rope_table(spec: RopeSpec, head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape ``[*positions.shape, head_dim]``, computed in fp32, cast to ``dtype``."""
    f = inv_freq(spec, head_dim, positions.device)
    angles = positions[..., None].float() * f  # [..., head_dim/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [B, S, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
