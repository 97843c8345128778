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


class _GatedActivation(torch.autograd.Function):
    """``act(g) * u`` saving only ``g`` and ``u`` (autograd would also keep ``act(g)``, the size of the
    MLP's intermediate); the backward recomputes ``act(g)`` and its derivative."""

    @staticmethod
    def forward(ctx, g, u, approximate: str):
        ctx.save_for_backward(g, u)
        ctx.approximate = approximate
        return F.gelu(g, approximate=approximate) * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gp):
        g, u = ctx.saved_tensors
        gg = gu = None
        if ctx.needs_input_grad[1]:
            gu = gp * F.gelu(g, approximate=ctx.approximate)
        if ctx.needs_input_grad[0]:
            gg = torch.ops.aten.gelu_backward(gp * u, g, approximate=ctx.approximate)
        return gg, gu, None


GELU_APPROXIMATE = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[activation]
        self.gelu_approximate = GELU_APPROXIMATE.get(activation)  # None: not a GELU (autograd path)

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        """``hook(name, tensor) -> tensor`` taps mlp.hook_pre / hook_pre_linear / hook_post when given."""
        if hook is None:
            g, u = self.gate_proj(x), self.up_proj(x)
            lean = torch.is_grad_enabled() and (g.requires_grad or u.requires_grad) and not torch.compiler.is_compiling()
            if self.gelu_approximate is not None and lean:  # eager training: see _GatedActivation
                return self.down_proj(_GatedActivation.apply(g, u, self.gelu_approximate))
            return self.down_proj(self.act(g) * u)
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        lin = hook("mlp.hook_pre_linear", self.up_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * lin))
