"""RMSNorm variants shared by the families.

All compute in fp32 and cast back at the end (Gemma activations exceed fp16 range; the reference
multiplies by the scale *before* the cast, unlike Llama).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rms_norm import rms, scaled_rms_norm


class GemmaRMSNorm(nn.Module):
    """Gemma 3: ``rms(x) * (1 + w)``; weights stored zero-centred (identity = 0)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_rms_norm(x, self.weight, self.eps, 1.0)

    def scale(self) -> torch.Tensor:
        """The multiplicative scale the norm applies (used when folding norms into weights)."""
        return 1.0 + self.weight.float()

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, scale=1+w"


class RMSNorm(nn.Module):
    """Gemma 4 / Mistral: ``rms(x) * w`` (identity = 1). ``with_scale=False`` has no weight.

    ``cast_before_scale``: Llama/Mistral cast the normalized value back to the input dtype
    before multiplying by w; Gemma 4 multiplies in fp32 first.
    """

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, cast_before_scale: bool = False):
        super().__init__()
        self.eps = eps
        self.cast_before_scale = cast_before_scale
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms(x, self.eps)
        if self.weight is None:
            return y.type_as(x)
        if self.cast_before_scale:
            return self.weight * y.to(x.dtype)
        return scaled_rms_norm(x, self.weight, self.eps, 0.0)

    def scale(self) -> torch.Tensor:
        return self.weight.float()

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else "no scale"
        return f"{shape}, eps={self.eps}"
