"""Mixture of experts: the Gemma 4 router and experts.

Router (exact reference order, ``Gemma4TextRouter``)::

    x = rms(r) * scale * hidden**-0.5        # norm without weight, then a learned scale
    p = softmax(proj(x)) in fp32
    w, idx = topk(p, k);  w /= w.sum(-1);  w *= per_expert_scale[idx]

No auxiliary loss, no capacity limit, no token dropping.

Experts: ``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I] (HF layout, so
checkpoints load unchanged); each (token, expert) pair computes
``down(gelu_tanh(gate(x)) * up(x)) * w`` and a token sums its k pairs (``ops.grouped_experts``).
Expert parallelism is applied from outside (``gemmaforge.parallel.ep``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.grouped_experts import GroupedExperts, act, pick_impl
from .norm import RMSNorm


class Gemma4Router(nn.Module):
    """Top-k softmax router. forward(x [N, H]) -> (probs [N, E] fp32, weights [N, k], index [N, k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float = 1e-6):
        super().__init__()
        self.top_k = top_k
        self.root_size = hidden ** -0.5
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor):
        h = self.norm(x) * self.scale * self.root_size
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # (N, E)
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        w = w / w.sum(dim=-1, keepdim=True)
        w = w * self.per_expert_scale[idx]
        return probs, w, idx


class Gemma4Experts(nn.Module):
    """E gated-MLP experts in HF's packed layout. forward(x [N, H], index [N, k], weights [N, k]) -> [N, H].

    ``impl``: "auto", "grouped" (``torch._grouped_mm``), "padded" (a few bucketed ``bmm`` calls,
    falling back to segments when the routing is too unbalanced), "segments" (one GEMM per
    expert), or "reference" (autograd through a loop over experts; the obvious, slow version).
    "auto" takes "grouped" on accelerators where the kernel exists and "padded" on CPU.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "gelu_pytorch_tanh"):
        super().__init__()
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"experts activation {activation!r} is not supported")
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.impl = "auto"
        self.pad_tolerance = 0.2  # "padded": at most 20% extra rows, else per-expert segments

    def resolve_impl(self, x: torch.Tensor) -> str:
        return pick_impl(self.impl, x, self.gate_up_proj)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        impl = self.resolve_impl(x)
        if impl == "reference":
            return self._reference(x, index, weights)
        xw = x.to(self.gate_up_proj.dtype)
        out = GroupedExperts.apply(xw, self.gate_up_proj, self.down_proj, weights, index, impl, self.pad_tolerance)
        return out.to(x.dtype)

    def _reference(self, x, index, weights):
        out = torch.zeros_like(x)
        I = self.intermediate
        for e in range(self.num_experts):
            tok, j = torch.where(index == e)
            if tok.numel() == 0:
                continue
            gu = F.linear(x[tok], self.gate_up_proj[e])
            y = F.linear(act(gu[:, :I]) * gu[:, I:], self.down_proj[e]) * weights[tok, j, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        E, I2, H = self.gate_up_proj.shape
        return f"experts={E}, hidden={H}, intermediate={I2 // 2}, impl={self.impl}"
