"""Gradient norms and clipping for any mix of DTensor (TP, FSDP, EP, both) and plain gradients."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _replicated_factor(t: torch.Tensor) -> int:
    """How many ranks hold a copy of each element of this DTensor's local shard (1 for plain tensors)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return 1
    f = 1
    for i, pl in enumerate(t.placements):
        if isinstance(pl, Replicate):
            f *= t.device_mesh.size(i)
    return f


_BLOCK = 1 << 22  # elements per float64 partial norm: no whole float64 copy of a large gradient


def _norm_pow_float64(g: torch.Tensor, p: float) -> torch.Tensor:
    """``sum |g|^p`` accumulated in float64, over blocks of the flattened tensor."""
    flat = g.reshape(-1)
    return sum(torch.linalg.vector_norm(b, p, dtype=torch.float64).pow(p) for b in flat.split(_BLOCK))


@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0, group=None,
              extra_owner_factor=None) -> torch.Tensor:
    """The global gradient norm over DTensor/plain grads and ranks (a float64 0-d tensor, same on every rank).

    Each element counts once: a DTensor's local shard contributes ``|g|^p / (number of ranks holding
    the same elements)``, then one all-reduce sums over ``group`` (default: the world). Plain
    tensors are assumed to be held by one rank only unless ``extra_owner_factor(p)`` says otherwise
    (pipeline stages own disjoint plain parameters).
    """
    params = [p for p in params if p.grad is not None]
    inf = math.isinf(norm_type)
    acc = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = local(p.grad).detach()
        if g.numel() == 0:
            continue
        if inf:
            acc = torch.maximum(acc, g.abs().max().double().cpu())
        else:
            f = _replicated_factor(p.grad)
            if extra_owner_factor is not None:
                f *= extra_owner_factor(p)
            acc = acc + _norm_pow_float64(g, norm_type).cpu() / f
    if dist.is_initialized():
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    return acc if inf else acc.pow(1.0 / norm_type)


