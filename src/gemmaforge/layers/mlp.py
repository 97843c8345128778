"""Gated MLP: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    # Gemma: tanh approximation of GELU (not exact erf GELU)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _gate_up_grads(ctx, gp: torch.Tensor, g: torch.Tensor, u: torch.Tensor, a: torch.Tensor):
    """Gradients of ``act(g) * u`` for ``g`` and ``u`` given ``gp`` = d/d(act(g) * u), ``a`` = act(g)."""
    gu = gp * a if ctx.needs_input_grad[1] else None
    gg = torch.ops.aten.gelu_backward(gp * u, g, approximate=ctx.approximate) if ctx.needs_input_grad[0] else None
    return gg, gu


class _GatedActivation(torch.autograd.Function):
    """``act(g) * u`` saving only ``g`` and ``u`` (autograd would also keep ``act(g)``, the size of the
    MLP's intermediate); the backward recomputes ``act(g)`` and its derivative. For a down projection
    that ``_GatedDown`` cannot take (a LoRA wrapper, a hooked module, a sharded weight)."""

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


class _GatedDown(torch.autograd.Function):
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


def _module_hooked(m: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


GELU_APPROXIMATE = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[activation]
        self.gelu_approximate = GELU_APPROXIMATE.get(activation)  # None: not a GELU (autograd path)

    def _plain_down(self) -> bool:
        """A plain bias-free ``nn.Linear`` down projection with a plain weight (not a LoRA wrapper or a
        tensor-parallel DTensor) that no module hook watches: ``_GatedDown`` may take it. It does not
        call the module, so a hook (a user's, or the health check's per-module probes) would not run;
        then the module is called."""
        d = self.down_proj
        return (type(d) is nn.Linear and d.bias is None and type(d.weight.data) is torch.Tensor
                and not _module_hooked(d))

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        """``hook(name, tensor) -> tensor`` taps mlp.hook_pre / hook_pre_linear / hook_post when given."""
        if hook is None:
            g, u = self.gate_proj(x), self.up_proj(x)
            d = self.down_proj
            if self.gelu_approximate is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # eager training: autograd would save act(g) and act(g) * u as well as g and u
                if (g.requires_grad or u.requires_grad or d.weight.requires_grad) and self._plain_down():
                    return _GatedDown.apply(g, u, d.weight, self.gelu_approximate)
                if g.requires_grad or u.requires_grad:
                    return d(_GatedActivation.apply(g, u, self.gelu_approximate))
            return d(self.act(g) * u)
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        lin = hook("mlp.hook_pre_linear", self.up_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * lin))
