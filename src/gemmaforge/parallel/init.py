"""Build a model on the meta device, shard it, then allocate and fill each rank's part.

Random init is layout-independent: every parameter is generated full-size from its own generator,
seeded by ``(seed, parameter name)``, and each rank keeps its shard, so FSDP, TP, PP and one
process get exactly the same weights.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..models.registry import build_model
from .dims import pipeline_stage
from .grads import local


def build_meta_model(cfg, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The family's model on the meta device (no memory): parallelize it, then ``materialize``."""
    return build_model(cfg, dtype=dtype, device="meta")


def _local_shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``param`` (a DTensor, possibly FSDP-sharded) holds on this rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    d = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return d.to_local()


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def canonical_name(model: nn.Module, name: str) -> str:
    """A parameter's name in the full model (init seeds, loading, optimizer grouping): a tied LM head
    is ``model.embed_tokens.weight`` (pipeline stages keep the tie, so ``named_parameters`` already
    reports that name; a module that holds the head weight untied is mapped here)."""
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    return name


def retie(model: nn.Module) -> None:
    """``to_empty`` from meta replaces each Parameter object, which unties a tied LM head: tie it again."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if getattr(model.config, "tie_word_embeddings", False) and emb is not None and head is not None:
        if head.weight is not emb.weight:
            head.weight = emb.weight


@torch.no_grad()
def materialize(model: nn.Module, device: str | torch.device = "cpu", *, seed: int | None = None,
                state_dict: dict | None = None, broadcast: bool | None = None,
                init_std: float = 0.02) -> nn.Module:
    """Allocate a meta-built (possibly sharded, possibly a pipeline stage) model on ``device`` and fill it.

    * ``state_dict`` (full, unsharded, our parameter names) with ``broadcast=True`` (the default
      when distributed and the model is not a pipeline stage): needed on rank 0 only, ``{}``
      elsewhere; ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` sends
      each tensor and every rank keeps its shard.
    * ``state_dict`` with ``broadcast=False``: every rank holds the full dict (e.g. each read the
      checkpoint file) and copies its own shard of each parameter; no communication (the default
      for pipeline stages).
    * a pipeline stage with ``broadcast=True``: rank 0 alone holds the full dict and sends it one
      tensor at a time; every rank copies its shard of the tensors its stage holds (peak extra
      memory: the largest single tensor).
    * otherwise random init with the model's own ``init_weights`` rule, one parameter at a time,
      each generated full-size from its own generator seeded by ``(seed, parameter name)``: every
      layout (FSDP, TP, PP, one process) gets exactly the same weights. Peak extra memory: the
      largest single parameter.
    """
    model.to_empty(device=device)
    retie(model)
    is_stage = pipeline_stage(model) is not None
    if broadcast is None:
        broadcast = dist.is_initialized() and not is_stage
    if state_dict is not None and broadcast and is_stage:
        _load_stage_from_rank0(model, state_dict)
        return model
    if state_dict is not None and broadcast:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = dict(state_dict)
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, sd, options=opts)
        return model
    seed = torch.initial_seed() if seed is None else seed
    for name, p in model.named_parameters():
        key = canonical_name(model, name)
        if state_dict is not None:
            if key not in state_dict:
                raise CheckpointError(f"state dict has no tensor {key!r}")
            full = state_dict[key].to(dtype=p.dtype)
        else:
            full = torch.empty(tuple(p.shape), dtype=p.dtype, device="cpu")
            gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, key))
            model.init_parameter(key, full, init_std, gen)
        local(p).copy_(_local_shard_of(full, p).to(p.device))
    if state_dict is None:
        model.init_buffers()
    else:
        persistent = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in persistent and name in state_dict:
                b.copy_(state_dict[name].to(device=b.device, dtype=b.dtype))
    return model


@torch.no_grad()
def _load_stage_from_rank0(model: nn.Module, state_dict: dict) -> None:
    """Broadcast rank 0's full ``state_dict`` tensor by tensor; each rank keeps what its (sharded) stage holds."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    meta = [None]
    if dist.get_rank() == 0:
        meta = [[(k, tuple(v.shape), v.dtype) for k, v in state_dict.items() if not (tied and k == "lm_head.weight")]]
    dist.broadcast_object_list(meta, src=0)
    targets = {canonical_name(model, n): p for n, p in model.named_parameters()}
    persistent = set(model.state_dict().keys())
    targets.update({n: b for n, b in model.named_buffers() if n in persistent})
    first = next(iter(targets.values()), None)
    comm = first.device if first is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    if dist.get_backend() == "nccl" and comm.type != "cuda":
        comm = torch.device("cuda", torch.cuda.current_device())
    done = set()
    for key, shape, dtype in meta[0]:
        if dist.get_rank() == 0:
            t = state_dict[key].detach().to(device=comm, dtype=dtype).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(t, src=0)
        p = targets.get(key)
        if p is not None:
            if tuple(p.shape) != shape:
                raise CheckpointError(f"state dict tensor {key!r} has shape {list(shape)}, the model {list(p.shape)}")
            local(p).copy_(_local_shard_of(t.to(p.dtype), p).to(local(p).device))
            done.add(key)
    missing = sorted(set(targets) - done)
    if missing:
        raise CheckpointError(f"state dict has no tensor {missing[0]!r}")
