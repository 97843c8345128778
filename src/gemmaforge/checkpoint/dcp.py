"""Distributed training checkpoints (``torch.distributed.checkpoint``): save at one layout, resume at another.

    save_distributed(path, model, optimizer, extra={"step": 12, "data": {...}, "scheduler": ...})
    extra = load_distributed(path, model, optimizer)   # any layout, 1 process included

Each rank writes only its own shards (``get_state_dict`` gives FQN-keyed DTensor/plain state for
the model and the optimizer, parameter names unchanged by the parallel transforms); DCP's planner
reshards on load, so a checkpoint written by FSDP2 x 2 loads into one plain process, into TP x 2,
into FSDP x 4... ``extra`` (step, data position, scheduler state: small, picklable) is written by
rank 0 as ``extra.pt`` next to DCP's files. ``meta.json`` is written last, by rank 0, after a
barrier: a directory without it is incomplete and is refused.

For a single-file HF model of a sharded run use ``gemmaforge.transforms.parallel.export_hf``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError

FORMAT = "gemmaforge-dcp"
VERSION = 2  # 2: optimizer state flattened per parameter (each rank's own param_groups entries)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _options():
    """Optimizer state flattened to ``state.<fqn>.<key>`` / ``param_groups.<fqn>.<key>``: every rank
    saves and loads the group settings of its own parameters. (Unflattened, ``param_groups`` is one
    non-tensor object that DCP keeps from a single rank, wrong for pipeline stages and any layout
    where ranks hold different parameters.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer, options=_options())
    return {"model": msd, "optim": osd}


def save_distributed(path: str | os.PathLike, model, optimizer=None, extra: dict | None = None) -> Path:
    """Collective: every rank writes its shards under ``path`` (created; an existing one is replaced)."""
    import torch.distributed.checkpoint as dcp

    p = Path(path)
    if _rank() == 0:
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)
    _barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(p))
    _barrier()
    if _rank() == 0:
        torch.save(extra or {}, p / "extra.pt")
        world = dist.get_world_size() if _is_dist() else 1
        (p / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "world_size": world,
                                                 "has_optimizer": optimizer is not None}) + "\n")
    _barrier()
    return p


def load_distributed(path: str | os.PathLike, model, optimizer=None) -> dict:
    """Collective: load ``path`` into ``model`` (and ``optimizer``) at the current layout; returns ``extra``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict, set_model_state_dict

    p = Path(path)
    meta_path = p / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{p}: not a complete distributed checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: unreadable") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('version')}, this gemmaforge reads {VERSION}")
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"{p}: saved without optimizer state")
    state = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(p))
    except Exception as e:  # missing / mis-shaped keys: name them in one line
        raise CheckpointError(f"{p}: cannot load ({str(e).splitlines()[0][:300]})") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options())
    return torch.load(p / "extra.pt", weights_only=False)
