"""Whole (unsharded) state dicts of a parallel model (the trainer exports them as one HF model)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .dims import parallel_state, pipeline_stage


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict (CPU tensors) on global rank 0, ``{}`` elsewhere; collective.

    A pipeline stage contributes its own parameters: stages' dicts are merged on rank 0 (names are
    the full model's, so the merge is a plain union; the tied head copy appears as ``lm_head.weight``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if pipeline_stage(model) is None:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # every rank of the stage gets its full tensors (all-gathers over the stage's FSDP/TP meshes)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in sd.items()}
    st = parallel_state(model)
    inner_rank0 = st is None or all(st.mesh[n].get_local_rank() == 0 for n in ("dp_shard", "cp", "tp"))
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sd if inner_rank0 else None, parts, dst=0)
    if dist.get_rank() != 0:
        return {}
    merged: dict = {}
    for part in parts:
        merged.update(part or {})
    return merged


