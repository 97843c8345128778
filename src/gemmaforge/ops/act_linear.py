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
        gy2 = gy.reshape(-1, gy.shape[-1])
        gh = gw = gb = None
        if ctx.needs_input_grad[1]:
            a = F.gelu(h, approximate=ctx.approximate).reshape(-1, h.shape[-1]).to(gy.dtype)
            gw = cpu_gemm.mm(gy2.t(), a).to(weight.dtype)
            del a
        if ctx.needs_input_grad[2] and ctx.has_bias:
            gb = gy2.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            ga = cpu_gemm.mm(gy2, weight.to(gy.dtype)).reshape(h.shape)
            gh = torch.ops.aten.gelu_backward(ga, h, approximate=ctx.approximate)
        return gh, gw, gb, None
