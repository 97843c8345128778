"""The one place that applies a parallel layout to a model, in a fixed order (torchtitan style):
expert parallelism -> tensor parallelism -> activation checkpointing -> ``torch.compile`` -> FSDP2.

    from gemmaforge.parallel import ParallelDims, ParallelConfig, parallelize
    dims = ParallelDims(dp_shard=2, tp=2)                 # 4 processes
    dims.validate(world_size, model.config)               # one-line LayoutError on a bad layout
    mesh = dims.build_mesh("cpu")
    parallelize(model, mesh, ParallelConfig(activation_checkpointing=True))

The model files are single-device code. Everything here works through module boundaries that
already exist in every family (``model.model.layers`` keyed by ``str(i)``, ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, optional per-head ``q_norm``/``k_norm``, ``lm_head``), so parameter
names, and therefore state_dict keys, never change. Pipeline parallelism splits the model first
(``pp.Pipeline``), then each stage goes through ``parallelize`` with the same mesh; context
parallelism needs nothing applied to the model (``cp.ContextParallel`` shards the batch).
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .checkpointing import apply_activation_checkpointing
from .compile import compile_blocks
from .dims import ParallelConfig, ParallelDims, ParallelState, mesh_dims, pipeline_stage
from .ep import apply_expert_parallel
from .fsdp import apply_fsdp
from .tp import apply_tp


def parallelize(model: nn.Module, mesh_or_dims, config: ParallelConfig | None = None) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 to ``model`` in place; returns it.

    ``mesh_or_dims``: a DeviceMesh from ``ParallelDims.build_mesh`` or a ``ParallelDims`` (the mesh
    is then built on the model's device type). Pipeline parallelism splits the model first
    (``pp.Pipeline``), then each stage goes through this function with the same mesh.
    """
    cfg = config or ParallelConfig()
    if isinstance(mesh_or_dims, ParallelDims):
        dev = next(model.parameters()).device.type
        mesh = mesh_or_dims.build_mesh("cpu" if dev == "meta" else dev)
    else:
        mesh = mesh_or_dims
    dims = mesh_dims(mesh)
    dims.validate(dims.world_size, getattr(model, "config", None))
    state = ParallelState(mesh, dims, cfg, stage=pipeline_stage(model))
    if not cfg.fsdp and dims.fsdp_size > 1:
        raise ConfigError(f"parallel layout: dp_shard x cp = {dims.fsdp_size} needs FSDP (it reduces their "
                          f"gradients); ParallelConfig(fsdp=False) is only for dp_shard = cp = 1")
    if dims.ep > 1:
        apply_expert_parallel(model, mesh=state.expert_mesh)
        state.applied.append(f"ep={dims.ep} (experts sharded over ep, replicated over dp_shard/ep={dims.dp_mod_ep}"
                             f" x cp={dims.cp})")
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        state.applied.append(f"tp={dims.tp}")
    if cfg.activation_checkpointing:
        every = 1 if cfg.activation_checkpointing is True else int(cfg.activation_checkpointing)
        apply_activation_checkpointing(model, every=every)
        state.applied.append(f"activation_checkpointing(every={every})")
    if cfg.compile:
        compile_blocks(model, backend=cfg.compile_backend)
        state.applied.append(f"compile(per block, {cfg.compile_backend or 'inductor'})")
    if cfg.fsdp and dims.fsdp_size > 1:
        apply_fsdp(model, mesh["dp_shard_cp"], cfg)
        state.applied.append(f"fsdp2(dp_shard x cp = {dims.fsdp_size})")
    model.transforms.parallel = state
    return model
