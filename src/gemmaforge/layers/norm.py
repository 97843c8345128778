"""RMSNorm variants shared by the families.

All compute in fp32 and cast back at the end (Gemma activations exceed fp16 range; the reference
multiplies by the scale *before* the cast, unlike Llama).
"""

from __future__ import annotations

import torch
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _ScaledRMSNorm(torch.autograd.Function):
    """``(rms(x) * (offset + w)).to(x.dtype)`` in fp32 with a hand-written backward.

    The forward is the same op sequence as the plain path (bit-identical output). Autograd over the
    plain path keeps ~4 fp32 copies of ``x`` per norm for backward (the fp32 cast, ``x * r``, the
    square, the scaled output); this keeps ``x`` and the per-row ``1/rms`` only and recomputes the
    rest: 6 norms per Gemma 3 layer make that ~35% of a training step's saved activations.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        y = (x.float() * r * (offset + weight.float())).to(x.dtype)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, r = ctx.saved_tensors
        n = x.float() * r
        g = gy.float()
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gn = g * (ctx.offset + weight.float())
            gx = (r * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None, None


def scaled_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``rms(x) * (offset + w)`` cast back to ``x.dtype``; the memory-lean autograd path when training
    eagerly (under ``torch.compile`` the plain ops go to inductor, which fuses and recomputes itself)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
        return _ScaledRMSNorm.apply(x, weight, eps, offset)
    return (_rms(x, eps) * (offset + weight.float())).type_as(x)


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
        y = _rms(x, self.eps)
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
