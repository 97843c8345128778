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
            if ctx.needs_input_grad[1]:
                gu = gp * a
            if ctx.needs_input_grad[0]:
                gg = torch.ops.aten.gelu_backward(gp * u, g, approximate=ctx.approximate)
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

    def _lean_down(self, g: torch.Tensor, u: torch.Tensor) -> bool:
        """Eager training through a plain bias-free ``nn.Linear`` down projection with a plain weight
        (not a LoRA wrapper, a tensor-parallel DTensor or a compiled graph) that no module hook
        watches (``_GatedDown`` does not call the module, so its hooks would not run; with a hook,
        e.g. the health check's per-module probes, the module is called): ``_GatedDown`` applies."""
        d = self.down_proj
        return (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad or d.weight.requires_grad)
                and type(d) is nn.Linear and d.bias is None and type(d.weight.data) is torch.Tensor
                and not _module_hooked(d) and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        """``hook(name, tensor) -> tensor`` taps mlp.hook_pre / hook_pre_linear / hook_post when given."""
        if hook is None:
            g, u = self.gate_proj(x), self.up_proj(x)
            if self.gelu_approximate is not None and self._lean_down(g, u):  # eager training: see _GatedDown
                return _GatedDown.apply(g, u, self.down_proj.weight, self.gelu_approximate)
            return self.down_proj(self.act(g) * u)
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        lin = hook("mlp.hook_pre_linear", self.up_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * lin))
