"""The lean RMSNorm autograd: ``(rms(x) * (offset + w)).to(x.dtype)`` saving ``x`` and ``1/rms`` only.

Output dtype: ``x.dtype``, except under CPU autocast (a bf16 training step on CPU; ``out_dtype``).
"""

from __future__ import annotations

import torch


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a scaled norm of ``x`` returns: ``x.dtype``; under CPU autocast (``torch.autocast("cpu")``,
    the bf16 training step of ``cpu_policy.training_dtype``) the autocast dtype for an fp32 ``x`` and
    fp32 for a low-precision ``x``.

    The norm computes in fp32 either way; what changes is only where its one rounding happens. A
    norm of the fp32 residual stream (input, pre-MLP and final norms) feeds matmuls, which would cast
    its output to bf16 anyway, once per projection (q, k and v each cast the same tensor; the final
    norm's bf16 output is what tells the LM-head loss to multiply in bf16); a norm of a bf16 matmul
    output (post-attention / post-MLP norms, q/k norms) feeds the fp32 residual or RoPE, which would
    promote it to fp32 anyway: returning fp32 skips a rounding and a cast each way. Without autocast
    (and on CUDA) nothing changes."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if x.dtype == torch.float32:
            return torch.get_autocast_dtype("cpu")
        return torch.float32
    return x.dtype


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
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
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * r * (offset + weight.float())).to(out_dtype(x))
        del xf
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
    """``rms(x) * (offset + w)`` cast back to ``x.dtype`` (under CPU autocast: ``out_dtype``); the
    memory-lean autograd path when training eagerly (under ``torch.compile`` the plain ops go to
    inductor, which fuses and recomputes itself)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
        return _ScaledRMSNorm.apply(x, weight, eps, offset)
    return (rms(x, eps) * (offset + weight.float())).to(out_dtype(x))
