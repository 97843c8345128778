"""AdamW with its parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..parallel.init import canonical_name
from .config import TrainConfig


def param_groups(model, weight_decay: float, decay_all: bool) -> list[dict]:
    """No weight decay on norms, biases and embeddings unless asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = canonical_name(model, name)
        skip = p.dim() < 2 or "embed" in name or "norm" in name
        (no_decay if skip and not decay_all else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _shape(schedule: str, t: float) -> float:
    """1 -> 0 over t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t


def lr_lambda(cfg: TrainConfig, anchor: tuple[int, float] | None = None):
    """The learning-rate factor of step index ``step`` (0-based: the rate of step ``step + 1``): linear
    warm-up, then ``cfg.schedule`` from 1 down to ``min_lr_ratio`` at ``cfg.steps``.

    ``anchor = (s, f)``: a resumed run whose ``--steps`` changed continues from factor ``f`` at step ``s``
    (the rate in force when it was saved) down to ``min_lr_ratio`` at the new ``cfg.steps``, so the
    rate never rises again (a constant schedule has nothing to re-fit)."""
    def f(step: int) -> float:
        if anchor is not None and step >= anchor[0] and cfg.schedule != "constant":
            s0, f0 = anchor
            return cfg.min_lr_ratio + (f0 - cfg.min_lr_ratio) * _shape(cfg.schedule, (step - s0) / max(1, cfg.steps - s0))
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * _shape(cfg.schedule, t)

    return f


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: fused (one kernel over all of them, no per-parameter
    temporaries) where they are CPU/CUDA tensors, plain or sharded over ONE device mesh; the
    per-parameter loop where sharded parameters live on several meshes (expert parallelism's experts
    beside FSDP's shards), which one fused call cannot mix."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    meshes = {id(p.device_mesh) for p in params if isinstance(p, DTensor)}
    fused = len(meshes) <= 1 and all(p.device.type in ("cpu", "cuda") for p in params)
    kw = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_norms_and_embeddings), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
