"""Memory-lean autograd for the gated MLP's activation and down projection (GELU-tanh gates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gate_up_grads(ctx, gp: torch.Tensor, g: torch.Tensor, u: torch.Tensor, a: torch.Tensor):
    """Gradients of ``act(g) * u`` for ``g`` and ``u`` given ``gp`` = d/d(act(g) * u), ``a`` = act(g)."""
    gu = gp * a if ctx.needs_input_grad[1] else None
    gg = torch.ops.aten.gelu_backward(gp * u, g, approximate=ctx.approximate) if ctx.needs_input_grad[0] else None
    return gg, gu


class GatedActivation(torch.autograd.Function):
    """``act(g) * u`` saving only ``g`` and ``u`` (autograd would also keep ``act(g)``, the size of the
    MLP's intermediate); the backward recomputes ``act(g)`` and its derivative. For a down projection
    that ``GatedDown`` cannot take (a LoRA wrapper, a hooked module, a sharded weight)."""

    @staticmethod
    def forward(ctx, g, u, approximate: str):
        ctx.save_for_backward(g, u)
        ctx.approximate = approximate
        return F.gelu(g, approximate=approximate) * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gp):
        g, u = ctx.saved_tensors
        return (*_gate_up_grads(ctx, gp, g, u, F.gelu(g, approximate=ctx.approximate)), None)


class GatedDown(torch.autograd.Function):
    """``down(act(g) * u)`` for a plain bias-free ``down`` weight, saving only ``g`` and ``u``.

    Autograd would keep ``act(g)`` (for ``u``'s gradient) and the product (for the down weight's
    gradient), each the size of the MLP's intermediate; the backward recomputes both from ``g`` and
    ``u`` (two elementwise ops), so per layer one ``[T, intermediate]`` tensor is saved less than
    ``down_proj(act(g) * u)`` with a lean activation, and two less than plain autograd. The GEMMs are
    ``F.linear``'s (same shapes and operand order): the gradients equal the plain path's.
    """

    @staticmethod
    def forward(ctx, g, u, weight, approximate: str):
        ctx.save_for_backward(g, u, weight)
        ctx.approximate = approximate
        return F.linear(F.gelu(g, approximate=approximate) * u, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        g, u, weight = ctx.saved_tensors
        a = F.gelu(g, approximate=ctx.approximate)
        gy2 = gy.reshape(-1, gy.shape[-1])
        gg = gu = gw = None
        if ctx.needs_input_grad[2]:
            h = (a * u).reshape(-1, a.shape[-1]).to(gy.dtype)
            # under autocast the forward multiplied a copy of the weight in the autocast dtype; its
            # gradient reaches the weight cast back, as autograd's copy would cast it
            gw = gy2.t().mm(h).to(weight.dtype)
            del h
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gp = gy2.mm(weight.to(gy.dtype)).view(g.shape).to(g.dtype)  # d(act(g) * u)
            gg, gu = _gate_up_grads(ctx, gp, g, u, a)
        return gg, gu, gw, None
