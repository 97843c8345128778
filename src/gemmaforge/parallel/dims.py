"""Parallel layout: the size of each dimension, the device mesh, and what ``parallelize`` applied.

``ParallelDims(dp_shard, cp, tp, pp, ep)``: ``dp_shard=-1`` takes whatever the others leave; expert
parallelism borrows its ranks from ``dp_shard`` (torchtitan's convention). Every check is decided
from the command line, the world size and the model config alone, so every rank raises the same
one-line ``LayoutError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

DIM_NAMES = ("pp", "dp_shard", "cp", "tp")
EP_DIM_NAMES = ("pp", "dp_mod_ep", "ep", "cp", "tp")  # the mesh when ep > 1 (dp_shard = dp_mod_ep x ep, flattened)
PP_SCHEDULES = ("GPipe", "1F1B")


class LayoutError(ConfigError):
    """A bad parallel layout. Decided from the command line, the world size and the model config
    alone, so every rank raises the same one-line error (the CLI prints it on rank 0 only)."""


def pipeline_schedule_name(name: str) -> str:
    """``"gpipe"`` / ``"1f1b"`` (any case) -> the canonical ``"GPipe"`` / ``"1F1B"``; LayoutError otherwise."""
    for s in PP_SCHEDULES:
        if str(name).lower() == s.lower():
            return s
    raise LayoutError(f"parallel layout: --pp-schedule must be one of {', '.join(x.lower() for x in PP_SCHEDULES)} "
                      f"(got {name!r})")


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension; ``dp_shard=-1`` takes whatever the others leave.

    ``ep`` (expert parallelism) borrows its ranks from ``dp_shard`` (torchtitan's convention): it
    must divide ``dp_shard`` and does not change the world size ``dp_shard x cp x tp x pp``.
    """

    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def resolved(self, world_size: int) -> "ParallelDims":
        d = ParallelDims(self.dp_shard, self.cp, self.tp, self.pp, self.ep)
        for name in ("cp", "tp", "pp", "ep"):
            v = getattr(d, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"parallel layout: --{name.replace('_', '-')} must be a positive integer (got {v!r})")
        if d.dp_shard == -1:
            rest = d.cp * d.tp * d.pp
            if world_size % rest:
                raise LayoutError(f"parallel layout: cp={d.cp} x tp={d.tp} x pp={d.pp} = {rest} does not divide "
                                  f"the world size {world_size}")
            d.dp_shard = world_size // rest
        elif not isinstance(d.dp_shard, int) or d.dp_shard < 1:
            raise LayoutError(f"parallel layout: --dp-shard must be a positive integer or -1 (got {d.dp_shard!r})")
        return d

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.cp * self.tp * self.pp

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp

    @property
    def dp_mod_ep(self) -> int:
        """The dp_shard ranks outside one expert-parallel group (replicas of the same experts)."""
        return self.dp_shard // self.ep

    def describe(self) -> str:
        s = " x ".join(f"{n}={getattr(self, n)}" for n in ("dp_shard", "cp", "tp", "pp"))
        return s + (f" (ep={self.ep} within dp_shard)" if self.ep > 1 else "")

    def validate(self, world_size: int, model_config=None, seq_len: int | None = None) -> "ParallelDims":
        """Resolve ``-1`` and check the layout against the world size and the model; one-line ConfigError."""
        d = self.resolved(world_size)
        if d.world_size != world_size:
            raise LayoutError(f"parallel layout {d.describe()} needs {d.world_size} processes, "
                              f"but the world size is {world_size}")
        c = model_config
        if c is not None:
            checks = [("num_attention_heads", d.tp), ("num_key_value_heads", d.tp), ("intermediate_size", d.tp)]
            for key, n in checks:
                v = getattr(c, key, None)
                if v is not None and n > 1 and v % n:
                    raise LayoutError(f"parallel layout: tp={n} does not divide {key}={v}")
            layers = getattr(c, "num_hidden_layers", None)
            if layers is not None and d.pp > layers:
                raise LayoutError(f"parallel layout: pp={d.pp} is more stages than the {layers} decoder layers")
        if d.pp > 1 and d.cp > 1:
            raise LayoutError(f"parallel layout: pipeline parallelism (pp={d.pp}) cannot be combined with context "
                              f"parallelism (cp={d.cp})")
        if d.ep > 1:
            if d.dp_shard % d.ep:
                raise LayoutError(f"parallel layout: ep={d.ep} does not divide dp_shard={d.dp_shard} (expert "
                                  f"parallelism borrows its ranks from the data-parallel dimension)")
            for other in ("tp", "pp"):
                if getattr(d, other) > 1:
                    raise LayoutError(f"parallel layout: expert parallelism (ep={d.ep}) cannot be combined with "
                                      f"--{other} {getattr(d, other)} yet")
            if c is not None:
                E = getattr(c, "num_experts", None) if getattr(c, "enable_moe_block", False) else None
                if not E:
                    raise LayoutError(f"parallel layout: --ep {d.ep} needs a mixture-of-experts model, and "
                                      f"{type(c).__name__} ({getattr(c, 'model_type', '?')}) has no experts")
                if E % d.ep:
                    raise LayoutError(f"parallel layout: ep={d.ep} does not divide num_experts={E}")
        if seq_len is not None and d.cp > 1 and seq_len % d.cp:
            raise LayoutError(f"parallel layout: cp={d.cp} does not divide --seq-len {seq_len}")
        return d

    def build_mesh(self, device_type: str = "cpu"):
        """A DeviceMesh with dims ``pp, dp_shard, cp, tp`` (size-1 dims included) plus the flattened
        ``dp_shard_cp`` (FSDP) and ``dp`` (data loading: ranks that see different rows)."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise LayoutError("parallel layout: torch.distributed is not initialised (run under torchrun)")
        d = self.validate(dist.get_world_size())
        if d.ep > 1:  # dp_shard split into (dp_mod_ep, ep): the EP groups are contiguous dp_shard ranks
            mesh = init_device_mesh(device_type, (d.pp, d.dp_mod_ep, d.ep, d.cp, d.tp), mesh_dim_names=EP_DIM_NAMES)
            mesh["dp_mod_ep", "ep"]._flatten("dp_shard")
            mesh["dp_mod_ep", "ep", "cp"]._flatten("dp_shard_cp")
            return mesh
        mesh = init_device_mesh(device_type, (d.pp, d.dp_shard, d.cp, d.tp), mesh_dim_names=DIM_NAMES)
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return mesh


def mesh_dims(mesh) -> ParallelDims:
    names = mesh.mesh_dim_names or ()
    size = {n: mesh[n].size() for n in names}
    if "ep" in size:
        size["dp_shard"] = size["dp_mod_ep"] * size["ep"]
    return ParallelDims(**{n: size.get(n, 1) for n in (*DIM_NAMES, "ep")})


@dataclass
class ParallelConfig:
    activation_checkpointing: bool | int = False  # True / k: checkpoint every k-th block (True = every block)
    compile: bool = False  # torch.compile each decoder block
    compile_backend: str | None = None  # torch.compile backend (None: inductor; "aot_eager" for quick CPU tests)
    pp_schedule: str = "1F1B"  # pipeline schedule when pp > 1: "GPipe" or "1F1B" (any case)
    fsdp: bool = True  # shard with FSDP2 when dp_shard x cp > 1
    reshard_after_forward: bool | None = None  # None: blocks reshard, the root keeps its params
    param_dtype: torch.dtype | None = None  # FSDP mixed precision (e.g. torch.bfloat16); None = as stored
    reduce_dtype: torch.dtype | None = None


@dataclass
class ParallelState:
    """What ``parallelize`` did, kept on the model as ``model.transforms.parallel``."""

    mesh: object
    dims: ParallelDims
    config: ParallelConfig | None
    applied: list = field(default_factory=list)
    stage: object | None = None  # pp.StageInfo when the model is one pipeline stage

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.dims.tp > 1 else None

    @property
    def fsdp_mesh(self):
        return self.mesh["dp_shard_cp"]

    @property
    def dp_group(self):
        """Ranks that see different rows of data (FSDP's data-parallel ranks, not CP/TP)."""
        return self.mesh["dp_shard"].get_group()

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp_shard"].get_local_rank()

    @property
    def loss_group(self):
        """Ranks whose partial losses add up to the step's loss (dp_shard x cp)."""
        return self.mesh["dp_shard_cp"].get_group()

    @property
    def expert_mesh(self):
        """``dp_mod_ep x ep x cp`` when ep > 1: experts Shard(0) on ep, replicated on the others."""
        return self.mesh["dp_mod_ep", "ep", "cp"] if self.dims.ep > 1 else None

    def expert_replica_groups(self) -> list:
        """The groups over which expert gradients are still to be summed (dp_mod_ep, then cp; size > 1 only)."""
        if self.dims.ep == 1:
            return []
        return [self.mesh[n].get_group() for n in ("dp_mod_ep", "cp") if self.mesh[n].size() > 1]


def parallel_state(model: nn.Module) -> ParallelState | None:
    return model.transforms.parallel


def pipeline_stage(model: nn.Module):
    """The ``pp.StageInfo`` of a model cut down to one pipeline stage, else None."""
    st = getattr(getattr(model, "transforms", None), "parallel", None)
    return None if st is None else st.stage
