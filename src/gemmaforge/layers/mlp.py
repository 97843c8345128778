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


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        """``hook(name, tensor) -> tensor`` taps mlp.hook_pre / hook_pre_linear / hook_post when given."""
        if hook is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        lin = hook("mlp.hook_pre_linear", self.up_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * lin))
