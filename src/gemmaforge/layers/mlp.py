"""Gated MLP: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gated_mlp import GatedActivation, GatedDown

ACTIVATIONS = {
    # Gemma: tanh approximation of GELU (not exact erf GELU)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def own_hooks(m: nn.Module) -> bool:
    """``m`` has hooks of its own (forward, forward-pre, backward, backward-pre)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _module_hooked(m: nn.Module) -> bool:
    """A hook would run if ``m`` were called: its own, or a global module hook."""
    from torch.nn.modules import module as _m

    return bool(own_hooks(m) or _m._global_forward_hooks or _m._global_forward_pre_hooks
                or _m._global_backward_hooks or _m._global_backward_pre_hooks)


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
        """A plain bias-free ``nn.Linear`` (or subclass: ``cpu_policy.PackedLinear``) down projection with a plain weight (not a LoRA wrapper or a
        tensor-parallel DTensor) that no module hook watches: ``GatedDown`` may take it. It does not
        call the module, so a hook (a user's, or the health check's per-module probes) would not run;
        then the module is called."""
        d = self.down_proj
        return (isinstance(d, nn.Linear) and d.bias is None and type(d.weight.data) is torch.Tensor
                and not _module_hooked(d))

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        """``hook(name, tensor) -> tensor`` taps mlp.hook_pre / hook_pre_linear / hook_post when given."""
        if hook is None:
            g, u = self.gate_proj(x), self.up_proj(x)
            d = self.down_proj
            if self.gelu_approximate is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                # eager training: autograd would save act(g) and act(g) * u as well as g and u
                if (g.requires_grad or u.requires_grad or d.weight.requires_grad) and self._plain_down():
                    return GatedDown.apply(g, u, d.weight, self.gelu_approximate)
                if g.requires_grad or u.requires_grad:
                    return d(GatedActivation.apply(g, u, self.gelu_approximate))
            return d(self.act(g) * u)
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        lin = hook("mlp.hook_pre_linear", self.up_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * lin))
