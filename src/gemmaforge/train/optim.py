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


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

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
