"""``LayerNorm`` followed by the linear layers that read its output, keeping only the norm's input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_gemm


class LayerNormLinears(torch.autograd.Function):
    """``(F.linear(y, W_i, b_i) for each i)`` with ``y = layer_norm(x)``. Autograd would keep ``y`` for
    the weights' gradients (``[tokens, width]``) next to ``x`` (the norm's own); this keeps ``x`` and
    recomputes ``y`` in the backward (one elementwise pass). The products go through ``cpu_gemm``
    (oneDNN on CPUs where it beats ATen's fp32 GEMM).

    ``apply(x, norm_weight, norm_bias, eps, W_1, b_1, W_2, b_2, ...)`` -> ``(out_1, out_2, ...)``."""

    @staticmethod
    def forward(ctx, x, nw, nb, eps: float, *wb):
        y = F.layer_norm(x, (x.shape[-1],), nw, nb, eps)
        ctx.save_for_backward(x, nw, nb, *wb)
        ctx.eps = eps
        return tuple(cpu_gemm.linear(y, wb[i], wb[i + 1]) for i in range(0, len(wb), 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        x, nw, nb, *wb = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            xd = x.detach().requires_grad_(need[0])
            nwd = nw.detach().requires_grad_(need[1]) if nw is not None else None
            nbd = nb.detach().requires_grad_(need[2]) if nb is not None else None
            y = F.layer_norm(xd, (x.shape[-1],), nwd, nbd, ctx.eps)
        y2 = y.detach().reshape(-1, y.shape[-1])
        gy = None
        gwb = []
        for k, g in enumerate(gouts):
            w, b = wb[2 * k], wb[2 * k + 1]
            g2 = g.reshape(-1, g.shape[-1]).to(y2.dtype)
            gwb.append(cpu_gemm.mm(g2.t(), y2).to(w.dtype) if need[4 + 2 * k] else None)
            gwb.append(g2.sum(0).to(b.dtype) if b is not None and need[5 + 2 * k] else None)
            part = cpu_gemm.mm(g2, w.to(g2.dtype))
            gy = part if gy is None else gy.add_(part)
        inputs = [t for t, n in ((xd, need[0]), (nwd, need[1]), (nbd, need[2])) if n and t is not None]
        got = iter(torch.autograd.grad(y, inputs, gy.reshape(y.shape))) if inputs else iter(())
        gx = next(got) if need[0] else None
        gnw = next(got) if need[1] and nw is not None else None
        gnb = next(got) if need[2] and nb is not None else None
        return (gx, gnw, gnb, None, *gwb)
