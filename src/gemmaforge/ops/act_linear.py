"""``linear(gelu(h), W, b)`` saving only ``h`` (a ViT MLP's second projection, e.g. SigLIP's fc2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_gemm


class GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)``. Autograd would keep both ``h`` (for GELU's backward) and
    ``gelu(h)`` (for the weight's gradient), each ``[tokens, intermediate]``; this keeps ``h`` and
    recomputes ``gelu(h)`` in the backward (one elementwise op). The products go through
    ``cpu_gemm`` (oneDNN on CPUs where it beats ATen's fp32 GEMM)."""

    @staticmethod
    def forward(ctx, h, weight, bias, approximate: str):
        ctx.save_for_backward(h, weight)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        return cpu_gemm.linear(F.gelu(h, approximate=approximate), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        h, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        ga, gw, gb = cpu_gemm.linear_grads(gy, lambda: F.gelu(h, approximate=ctx.approximate), weight, need[0],
                                           need[1], ctx.has_bias and need[2])
        gh = torch.ops.aten.gelu_backward(ga.reshape(h.shape), h, approximate=ctx.approximate) if need[0] else None
        return gh, gw, gb, None
