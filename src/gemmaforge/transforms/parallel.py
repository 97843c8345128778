"""Parallelism applied from outside the model (torchtitan style): TP -> AC -> compile -> FSDP2.

    from gemmaforge.transforms.parallel import ParallelDims, ParallelConfig, parallelize
    dims = ParallelDims(dp_shard=2, tp=2)                 # 4 processes
    dims.validate(world_size, model.config)               # one-line ConfigError on a bad layout
    mesh = dims.build_mesh("cpu")
    parallelize(model, mesh, ParallelConfig(activation_checkpointing=True))

The model files are single-device code. Everything here works through module boundaries that
already exist in every family (``model.model.layers`` keyed by ``str(i)``, ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, optional per-head ``q_norm``/``k_norm``), so parameter names, and
therefore state_dict keys, never change.

Order (fixed): tensor parallelism, activation checkpointing, ``torch.compile`` per block, FSDP2 per
block and at the root.

Tensor parallelism (DTensor ``parallelize_module``):

* q/k/v and gate/up: ``ColwiseParallel`` (output features = whole heads / MLP columns); the model's
  ``view(B, S, -1, head_dim)`` then sees the local head count, so no model change is needed.
* o_proj and down: ``RowwiseParallel`` (one all-reduce each, output replicated).
* q_norm/k_norm: per-head weights used by every head, so they stay replicated; their input is a
  local ``[B, H_local, S, D]`` tensor, wrapped as a DTensor sharded on the head dim so that the
  gradient of the replicated weight is summed over the TP ranks.
* everything else (embedding, the tied LM head, layer norms, final norm): replicated DTensors
  (``ReplicateParallel``: plain tensors in, plain tensors out). Every parameter is then a DTensor on
  the TP mesh, which keeps the optimizer, gradient clipping and FSDP's 2-D composition uniform.
* ``model.head_weight()`` is overridden on the instance to hand the loss a plain full ``[V, H]``
  tensor (the chunked loss works on plain tensors). Its gradient flows back into the replicated
  DTensor weight.

FSDP2: ``fully_shard`` on every decoder block and at the root; the root group holds the embedding,
the (tied) LM head and the final norm. The FSDP mesh is ``dp_shard x cp`` (context-parallel ranks
hold different tokens, so their gradients are reduced like data-parallel ones). Gradients are
SUMMED (divide factor 1): the trainer's loss is already ``sum over valid tokens / global valid
tokens``, so summing per-rank gradients gives exactly the single-process gradient.

Expert parallelism (``ParallelDims(ep=N)``, ``--ep N``; MoE models), torchtitan's convention: EP
borrows ``ep`` ranks from ``dp_shard`` (the world size stays ``dp_shard x cp x tp x pp``; the mesh
splits dp_shard into ``dp_mod_ep x ep``, contiguous ranks forming an EP group). It is applied
first: each MoE layer's experts are split over the EP group (``layers.moe.apply_expert_parallel``,
all-to-all token exchange) and become DTensors of the global ``[E, ...]`` tensors (Shard(0) on
``ep``, Replicate on ``dp_mod_ep`` and ``cp``), so full state dicts, HF export, DCP checkpoints
(resumable at any other layout) and the gradient norm see whole tensors. FSDP2 shards every other
parameter over all of ``dp_shard x cp`` and IGNORES the experts: they stay replicated over the
``dp_shard/ep x cp`` ranks outside their EP group, whose gradients ``sync_expert_grads`` sums after
the backward (within an EP group the all-to-all backward already gives each expert the gradient of
every token routed to it). Not combined with TP or PP yet.

Context parallelism (``ContextParallel``) and pipeline parallelism (``Pipeline``: stages split on
layer boundaries, GPipe / 1F1B schedules from ``torch.distributed.pipelining``) are below.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Iterable

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


# ============================================================================= layout

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
    """What ``parallelize`` did, kept on the model as ``model._gf_parallel``."""

    mesh: object
    dims: ParallelDims
    config: ParallelConfig
    applied: list = field(default_factory=list)

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
    return getattr(model, "_gf_parallel", None)


# ============================================================================= tensor parallelism

def _replicate_style():
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        """Parameters become replicated DTensors; tensor inputs/outputs stay plain tensors."""

        def _apply(self, module: nn.Module, device_mesh):
            def partition(name, mod, mesh):
                for n, p in list(mod.named_parameters(recurse=False)):
                    if isinstance(p, DTensor):
                        continue
                    d = distribute_tensor(p.data, mesh, [Replicate()], src_data_rank=0)
                    mod.register_parameter(n, nn.Parameter(d, requires_grad=p.requires_grad))

            def to_dt(x, mesh):
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
                    return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                return x

            def input_fn(mod, inputs, mesh):
                return tuple(to_dt(x, mesh) for x in inputs)

            def output_fn(mod, outputs, mesh):
                if isinstance(outputs, DTensor):
                    return outputs.to_local()
                if isinstance(outputs, tuple):
                    return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
                return outputs

            return distribute_module(module, device_mesh, partition, input_fn, output_fn)

    return ReplicateParallel()


def layer_tp_plan(layer: nn.Module) -> dict:
    """The TP plan of one decoder block (names relative to the block); only submodules that exist."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {}
    names = dict(layer.named_modules())
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        if n in names:
            plan[n] = ColwiseParallel()
    for n in ("self_attn.o_proj", "mlp.down_proj"):
        if n in names:
            plan[n] = RowwiseParallel()
    for n in ("self_attn.q_norm", "self_attn.k_norm"):
        if n in names:  # per-head norm on [B, H_local, S, D]: shard dim 1 = heads
            plan[n] = SequenceParallel(sequence_dim=1, use_local_output=True)
    return plan


def _full_head_weight(self) -> torch.Tensor:
    """``head_weight`` under TP: the replicated DTensor's local value (the full ``[V, H]`` weight)."""
    from torch.distributed.tensor import DTensor

    w = type(self).head_weight(self)
    return w.to_local() if isinstance(w, DTensor) else w


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from .checkpointing import decoder_layers

    tied = getattr(model.config, "tie_word_embeddings", False)
    for _, layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, layer_tp_plan(layer))
    # everything not covered by a plan: replicated (plain tensors in and out)
    head = getattr(model, "lm_head", None)
    emb = getattr(model.model, "embed_tokens", None)
    for name, mod in list(model.named_modules()):
        if tied and emb is not None and mod is head:
            continue  # tied: re-pointed at the embedding's DTensor below
        if any(not isinstance(p, DTensor) for p in mod.parameters(recurse=False)):
            parallelize_module(mod, tp_mesh, _replicate_style())
    if tied and emb is not None and head is not None:
        head.weight = emb.weight  # the embedding got a new (DTensor) Parameter: tie again
    object.__setattr__(model, "head_weight", types.MethodType(_full_head_weight, model))
    return model


# ============================================================================= FSDP2

def expert_parameters(model: nn.Module) -> list:
    """Parameters of the expert-parallel experts (FSDP leaves them alone; ``sync_expert_grads`` reduces them)."""
    from ..layers.moe import expert_parallel_modules

    return [p for m in expert_parallel_modules(model) for p in m.parameters()]


def apply_fsdp(model: nn.Module, fsdp_mesh, cfg: ParallelConfig) -> nn.Module:
    """FSDP2 per block and at the root. Expert-parallel experts are ignored: they are already split
    over the EP group and stay replicated over dp_shard/ep x cp (``sync_expert_grads``)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from .checkpointing import decoder_layers

    mp = MixedPrecisionPolicy(param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype)
    layers = [l for _, l in decoder_layers(model)]
    ignored = set(expert_parameters(model)) or None
    for i, layer in enumerate(layers):
        # the last block is needed first in backward: keeping it unsharded saves one all-gather
        rf = cfg.reshard_after_forward
        if rf is None:
            rf = i < len(layers) - 1
        fully_shard(layer, mesh=fsdp_mesh, reshard_after_forward=rf, mp_policy=mp, ignored_params=ignored)
    # root group: embedding + tied LM head + final norm (one group, so the tie is sharded once)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, ignored_params=ignored)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum: the loss is normalised by the global valid-token count
            # plain SUM collectives (no PREMUL_SUM, which gloo lacks); with factor 1 nothing is rescaled
            m.set_force_sum_reduction_for_comms(True)
    return model


# ============================================================================= torch.compile

def compile_blocks(model: nn.Module, backend: str | None = None, **kw) -> nn.Module:
    """``torch.compile`` every decoder block in place (``nn.Module.compile``: names and parameters unchanged).

    Per block, not the whole model: the blocks are where the FLOPs are, one compiled graph serves
    every block of a layer type, and FSDP2 / activation checkpointing keep working on the same
    block boundaries. ``backend=None`` is inductor.
    """
    from .checkpointing import decoder_layers

    for _, layer in decoder_layers(model):
        layer.compile(backend=backend or "inductor", **kw)
    return model


# ============================================================================= the entry point

def parallelize(model: nn.Module, mesh_or_dims, config: ParallelConfig | None = None) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 to ``model`` in place; returns it.

    ``mesh_or_dims``: a DeviceMesh from ``ParallelDims.build_mesh`` or a ``ParallelDims`` (the mesh
    is then built on the model's device type). Pipeline parallelism splits the model first
    (``build_pipeline``), then each stage module goes through this function with the same mesh.
    """
    cfg = config or ParallelConfig()
    if isinstance(mesh_or_dims, ParallelDims):
        dev = next(model.parameters()).device.type
        mesh = mesh_or_dims.build_mesh("cpu" if dev == "meta" else dev)
    else:
        mesh = mesh_or_dims
    dims = mesh_dims(mesh)
    dims.validate(dims.world_size, getattr(model, "config", None))
    state = ParallelState(mesh, dims, cfg)
    if not cfg.fsdp and dims.fsdp_size > 1:
        raise ConfigError(f"parallel layout: dp_shard x cp = {dims.fsdp_size} needs FSDP (it reduces their "
                          f"gradients); ParallelConfig(fsdp=False) is only for dp_shard = cp = 1")
    if dims.ep > 1:
        from ..layers.moe import apply_expert_parallel

        apply_expert_parallel(model, mesh=state.expert_mesh)
        state.applied.append(f"ep={dims.ep} (experts sharded over ep, replicated over dp_shard/ep={dims.dp_mod_ep}"
                             f" x cp={dims.cp})")
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        state.applied.append(f"tp={dims.tp}")
    if cfg.activation_checkpointing:
        from .checkpointing import apply_activation_checkpointing

        every = 1 if cfg.activation_checkpointing is True else int(cfg.activation_checkpointing)
        apply_activation_checkpointing(model, every=every)
        state.applied.append(f"activation_checkpointing(every={every})")
    if cfg.compile:
        compile_blocks(model, backend=cfg.compile_backend)
        state.applied.append(f"compile(per block, {cfg.compile_backend or 'inductor'})")
    if cfg.fsdp and dims.fsdp_size > 1:
        apply_fsdp(model, mesh["dp_shard_cp"], cfg)
        state.applied.append(f"fsdp2(dp_shard x cp = {dims.fsdp_size})")
    object.__setattr__(model, "_gf_parallel", state)
    return model


# ============================================================================= build on meta, materialise

def build_meta_model(cfg, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The family's model on the meta device (no memory): parallelize it, then ``materialize``."""
    from ..models import build_model

    return build_model(cfg, dtype=dtype, device="meta")


def _local_shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``param`` (a DTensor, possibly FSDP-sharded) holds on this rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    d = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return d.to_local()


def _param_seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def canonical_name(model: nn.Module, name: str) -> str:
    """A parameter's name in the full model (init seeds, loading, optimizer grouping). A tied LM head
    is ``model.embed_tokens.weight`` (pipeline stages keep the tie, so ``named_parameters`` already
    reports that name; a module that holds the head weight untied is mapped here)."""
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    return name


def _retie(model: nn.Module) -> None:
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
    _retie(model)
    is_stage = getattr(model, "_gf_pp_stage", None) is not None
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
    init = type(model).init_weights
    seed = torch.initial_seed() if seed is None else seed
    for name, p in model.named_parameters():
        key = canonical_name(model, name)
        if state_dict is not None:
            if key not in state_dict:
                from ..errors import CheckpointError

                raise CheckpointError(f"state dict has no tensor {key!r}")
            full = state_dict[key].to(dtype=p.dtype)
        else:
            full = torch.empty(tuple(p.shape), dtype=p.dtype, device="cpu")
            gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, key))
            proxy = types.SimpleNamespace(named_parameters=lambda n=key, t=full: iter([(n, t)]))
            init(proxy, init_std, generator=gen)
        local = _local_shard_of(full, p)
        _local(p).copy_(local.to(p.device))
    return model


@torch.no_grad()
def _load_stage_from_rank0(model: nn.Module, state_dict: dict) -> None:
    """Broadcast rank 0's full ``state_dict`` tensor by tensor; each rank keeps what its (sharded) stage holds."""
    from ..errors import CheckpointError

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
            _local(p).copy_(_local_shard_of(t.to(p.dtype), p).to(_local(p).device))
            done.add(key)
    missing = sorted(set(targets) - done)
    if missing:
        raise CheckpointError(f"state dict has no tensor {missing[0]!r}")


# ============================================================================= state dicts and export

def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict (CPU tensors) on global rank 0, ``{}`` elsewhere; collective.

    A pipeline stage contributes its own parameters: stages' dicts are merged on rank 0 (names are
    the full model's, so the merge is a plain union; the tied head copy appears as ``lm_head.weight``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model, "_gf_pp_stage", None) is None:
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


def export_hf(model: nn.Module, dst, tokenizer=None, dtype: torch.dtype | None = None):
    """Write one HF-format model directory from a sharded model (rank 0 writes; collective)."""
    from ..checkpoint.hf import load_into, save_hf
    from ..models import build_model

    sd = full_state_dict(model)
    out = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        plain = build_model(model.config, device="meta")
        load_into(plain, dict(sd), "sharded model", dtype=dtype or next(iter(sd.values())).dtype)
        out = save_hf(plain, dst, tokenizer=tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return out


# ============================================================================= gradients

def _local(t: torch.Tensor) -> torch.Tensor:
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
        g = _local(p.grad).detach()
        if g.numel() == 0:
            continue
        if inf:
            acc = torch.maximum(acc, g.abs().max().double().cpu())
        else:
            f = _replicated_factor(p.grad)
            if extra_owner_factor is not None:
                f *= extra_owner_factor(p)
            acc = acc + g.double().norm(norm_type).pow(norm_type).cpu() / f
    if dist.is_initialized():
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    return acc if inf else acc.pow(1.0 / norm_type)


@torch.no_grad()
def sync_expert_grads(model: nn.Module) -> None:
    """Sum the expert gradients over the ranks that hold the same experts (dp_shard/ep, then cp).

    Call once per step after every backward (before clipping). Within an EP group the all-to-all
    backward already brought each expert the gradient of every token routed to it; the replicas
    (other EP groups, context-parallel ranks) saw other tokens, so their gradients are summed like
    FSDP sums the others (divide factor 1: the loss is normalised by the global valid-token count).
    A no-op without expert parallelism or without replicas.
    """
    st = parallel_state(model)
    groups = st.expert_replica_groups() if st is not None else []
    if not groups:
        return
    params = [p for p in expert_parameters(model) if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must take part in the reduction
            p.grad = torch.zeros_like(p)
    if not params:
        return
    grads = [_local(p.grad) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    for g in groups:
        dist.all_reduce(flat, group=g)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, group=None,
                    extra_owner_factor=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for any mix of DTensor (TP, FSDP, both) and plain grads."""
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params, norm_type, group, extra_owner_factor)
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            _local(p.grad).mul_(coef)
    return total.float()


@torch.no_grad()
def grads_finite(params: Iterable[torch.Tensor], group=None) -> bool:
    """Every rank's gradients are finite (one all-reduce)."""
    bad = torch.zeros(())
    for p in params:
        if p.grad is not None:
            g = _local(p.grad)
            if g.numel() and not bool(torch.isfinite(g).all()):
                bad = torch.ones(())
                break
    if dist.is_initialized():
        dist.all_reduce(bad, group=group)
    return float(bad) == 0.0


# ============================================================================= context parallelism

class _GatherSeq(torch.autograd.Function):
    """All-gather equal shards along ``dim``; backward: sum the gradients over ranks, keep our shard."""

    @staticmethod
    def forward(ctx, x, dim, group, size, rank):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        ctx.dim, ctx.group, ctx.size, ctx.rank, ctx.n = dim, group, size, rank, x.shape[dim]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g):
        if dist.get_backend(ctx.group) == "nccl":
            chunks = [c.contiguous() for c in g.chunk(ctx.size, ctx.dim)]
            out = torch.empty_like(chunks[ctx.rank])
            dist.reduce_scatter(out, chunks, group=ctx.group)
            return out, None, None, None, None
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None, None, None


class _CPKeys:
    """Per-forward key source of a context-parallel rank, passed to the model as its ``cache``.

    The model's attention path already knows how to attend queries to keys that carry their own
    stream indices and document ids (that is what a KV cache is). For each layer ``update`` returns
    the K/V of the WHOLE sequence (all-gathered, differentiable) with global stream indices, and
    document ids in this rank's local numbering; ``seen`` makes the model give the local queries
    their global stream indices. Causal, sliding-window and document masks are then the global ones.
    """

    def __init__(self, cp: "ContextParallel", offset: int, key_doc: torch.Tensor, key_idx: torch.Tensor):
        self.cp, self.seen, self.key_doc, self.key_idx = cp, offset, key_doc, key_idx

    def update(self, layer, k, v, doc, idx):
        k = _GatherSeq.apply(k, 2, self.cp.group, self.cp.size, self.cp.rank)
        v = _GatherSeq.apply(v, 2, self.cp.group, self.cp.size, self.cp.rank)
        return k, v, self.key_doc.expand(k.shape[0], -1), self.key_idx

    def advance(self, n: int) -> None:  # nothing is kept between forwards
        pass


class ContextParallel:
    """Shard a packed sequence over the ranks of ``cp_mesh`` (contiguous equal shards).

        cp = ContextParallel(mesh["cp"])
        loss_sum = cp.loss_sum(model, batch)   # batch from collate_rows; this rank's share of the sum

    Each rank runs its ``T / cp`` tokens through the model; every attention layer all-gathers K/V
    so queries see the keys of their whole document with global positions (RoPE), global stream
    indices (causal and sliding-window masks) and global document ids (document mask). Gradients
    of the gathered K/V are summed back to the rank that produced them. The per-rank loss sums
    add up (over ``dp_shard x cp``, which FSDP reduces over) to the single-process sum.

    Attention per rank costs ``O(T/cp x T)`` (a dense mask over the gathered keys); causal load is
    not balanced (the last shard does the most work).
    """

    def __init__(self, cp_mesh_or_group):
        self.group = cp_mesh_or_group.get_group() if hasattr(cp_mesh_or_group, "get_group") else cp_mesh_or_group
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def shard(self, batch: dict) -> dict:
        """This rank's part of a collated batch: ``input_ids [1, S]``, ``labels [S]``, ``cu_seqlens``,
        ``position_ids [1, S]`` (global, restarting per document) and ``cache`` (the key source)."""
        ids = batch["input_ids"].reshape(-1)
        T = ids.numel()
        if T % self.size:
            raise ConfigError(f"context parallel: {T} tokens per micro-batch is not divisible by cp={self.size}")
        S = T // self.size
        off = self.rank * S
        cu = batch["cu_seqlens"].to(torch.long).reshape(-1)
        dev = ids.device
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev), (cu[1:] - cu[:-1]), output_size=T)
        pos = torch.arange(T, device=dev) - cu[:-1].to(dev)[doc]
        inner = [int(c) - off for c in cu.tolist() if off < int(c) < off + S]
        # a leading EMPTY segment: the local row always has >= 2 segments, so the model never treats
        # it as a single document (which would skip the document mask against the gathered keys);
        # local document ids are therefore (global id - id of our first token + 1)
        cu_local = torch.tensor([0, 0, *inner, S], dtype=torch.int32, device=dev)
        key_doc = (doc - doc[off] + 1)[None]
        cache = _CPKeys(self, off, key_doc, torch.arange(T, device=dev))
        return {"input_ids": ids[off:off + S][None], "labels": batch["labels"].reshape(-1)[off:off + S],
                "cu_seqlens": cu_local, "position_ids": pos[off:off + S][None], "cache": cache}

    def forward(self, model, batch: dict, **kw) -> torch.Tensor:
        """This rank's final hidden states ``[1, S, hidden]`` (``return_hidden``) for a collated batch."""
        part = self.shard(batch)
        return model(part["input_ids"], cu_seqlens=part["cu_seqlens"], position_ids=part["position_ids"],
                     cache=part["cache"], return_hidden=True, **kw), part

    def loss_sum(self, model, batch: dict, chunk_size: int = 1024) -> torch.Tensor:
        """This rank's sum of token losses (chunked cross-entropy, ``reduction="sum"``)."""
        from ..loss import chunked_cross_entropy

        hidden, part = self.forward(model, batch)
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.head_weight(), part["labels"],
                                     softcap=getattr(model.config, "final_logit_softcapping", None),
                                     chunk_size=chunk_size, reduction="sum")


# ============================================================================= pipeline parallelism

def split_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous, balanced layer ranges per stage (earlier stages get the remainder)."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass
class StageInfo:
    index: int
    num_stages: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def _cu_from_doc(doc: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of one packed row from its per-token segment ids ``[1, T]`` (non-decreasing)."""
    d = doc.reshape(-1)
    counts = torch.bincount(d - d[0], minlength=1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def _stage_forward(self, x: torch.Tensor, doc: torch.Tensor):
    """Forward of a pipeline stage: ids (first stage) or hidden states, plus the row's segment ids.

    Middle stages return ``(hidden, doc)`` so the next stage can rebuild the same attention layout;
    the last stage returns the final-normed hidden states (the loss applies the LM head in chunks).
    """
    info: StageInfo = self._gf_pp_stage
    h = self.embed(x) if info.is_first else x
    B, S = h.shape[:2]
    if B != 1:
        raise ConfigError("pipeline parallel: one packed row per micro-batch (micro_batch_rows=1)")
    ctx = self.make_context(B, S, h.device, h.dtype, cu_seqlens=_cu_from_doc(doc))
    for layer in self.model.layers.values():
        h = layer(h, ctx)
    if info.is_last:
        return self.model.norm(h)
    return h, doc


def _check_splittable(model: nn.Module) -> None:
    from ..models.base import CausalLM

    own = getattr(type(model), "run_layers", None)
    if own is not None and own is not getattr(CausalLM, "run_layers", None):
        raise LayoutError(f"parallel layout: pipeline parallelism splits models whose blocks pass only the hidden "
                          f"state (Gemma 3, Mistral); {type(model).__name__} is not supported with --pp")


def build_pipeline_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """Cut ``model`` (meta or real) down to one pipeline stage, in place; parameter names unchanged.

    Stage ``s`` keeps decoder layers ``split_layers(...)[s]`` (their ``ModuleDict`` keys, hence
    ``model.layers.N...`` names, survive), the first stage keeps the embedding, the last the final
    norm and the LM head. With a tied head the last stage keeps the embedding MODULE too (only as
    the head's weight: it embeds nothing), tied exactly as in the full model, so every stage's
    names, state-dict keys and optimizer-state keys are the full model's
    (``model.embed_tokens.weight`` + ``lm_head.weight``) and a DCP checkpoint moves between PP
    and any other layout. The two copies' gradients are summed by ``Pipeline.sync_tied_grads``
    (then identical AdamW updates keep them equal).
    """
    _check_splittable(model)
    ranges = split_layers(model.config.num_hidden_layers, num_stages)
    info = StageInfo(stage, num_stages, ranges[stage])
    keep = {str(i) for i in info.layers}
    for k in list(model.model.layers.keys()):
        if k not in keep:
            del model.model.layers[k]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not info.is_last:
        model.lm_head = None
        model.model.norm = None
    if not info.is_first and not (tied and info.is_last):
        model.model.embed_tokens = None
    _retie(model)
    object.__setattr__(model, "_gf_pp_stage", info)
    object.__setattr__(model, "forward", types.MethodType(_stage_forward, model))
    return model


class Pipeline:
    """One rank's pipeline stage and its schedule (``torch.distributed.pipelining``).

        model = build_meta_model(cfg)
        pipe = Pipeline(model, mesh, schedule="1f1b", n_microbatches=4)    # splits the model
        parallelize(pipe.module, mesh, ParallelConfig())                   # TP / FSDP inside the stage
        materialize(pipe.module, "cpu", state_dict=full_sd, broadcast=True) # rank 0 holds full_sd
        loss = pipe.step(input_ids, doc, labels, n_valid)                   # forward + backward
        pipe.sync_tied_grads(); clip_grad_norm_(..., extra_owner_factor=pipe.owner_factor); opt.step()
        val_sum = pipe.eval_loss_sum(input_ids, doc, labels)               # forward only (GPipe)

    ``input_ids``/``doc``/``labels``: ``[n_microbatches, T]`` (one packed row per micro-batch; ``doc``
    the per-token segment ids from ``row_segments``). The loss of micro-batch ``i`` is its chunked
    cross-entropy sum divided by ``n_valid`` (the step's global valid-token count), so gradients are
    not rescaled by the schedule (``scale_grads=False``). Returns the step's loss on every rank.

    Schedules: ``"GPipe"`` (all forwards, then all backwards) and ``"1F1B"`` (one forward, one
    backward: at most ``pp`` micro-batches of activations alive; needs ``n_microbatches >= pp``).
    """

    SCHEDULES = PP_SCHEDULES

    def __init__(self, model: nn.Module, mesh, schedule: str = "1F1B", n_microbatches: int = 1,
                 chunk_size: int = 1024):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        dims = mesh_dims(mesh)
        schedule = pipeline_schedule_name(schedule)
        if schedule == "1F1B" and n_microbatches < dims.pp:
            raise LayoutError(f"parallel layout: the 1F1B schedule needs at least pp={dims.pp} micro-batches per "
                              f"step, got {n_microbatches}")
        self.mesh = mesh
        self.pp_mesh = mesh["pp"]
        self.pp_group = self.pp_mesh.get_group()
        self.pp_rank = self.pp_mesh.get_local_rank()
        self.num_stages = dims.pp
        self.module = build_pipeline_stage(model, self.pp_rank, dims.pp)
        self.info: StageInfo = self.module._gf_pp_stage
        self.n_valid = 1
        self.chunk_size = chunk_size
        self.n_microbatches = n_microbatches
        self.dtype = None  # activation dtype between stages (None: the parameters' dtype)
        self._schedule_name = schedule
        self._schedule_cls = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}[schedule]
        self._gpipe_cls = ScheduleGPipe
        self._stage_cls = PipelineStage
        self._schedule = None
        self._eval_schedules: dict = {}
        self._tied_group = self._make_tied_group()

    @property
    def schedule(self) -> str:
        return self._schedule_name

    def describe(self) -> str:
        r = self.info.layers
        return (f"pipeline {self._schedule_name}, stage {self.info.index + 1}/{self.num_stages} "
                f"(layers {r.start}-{r.stop - 1}), {self.n_microbatches} micro-batches per step")

    def _make_tied_group(self):
        """A 2-rank group (first stage, last stage) per pipeline, for the tied embedding/head."""
        if not getattr(self.module.config, "tie_word_embeddings", False) or self.num_stages == 1:
            return None
        ranks = self.mesh.mesh.reshape(self.num_stages, -1)  # pp is the outermost mesh dim
        mine = None
        for col in range(ranks.shape[1]):
            pair = [int(ranks[0, col]), int(ranks[-1, col])]
            g = dist.new_group(pair)  # collective over the world: every rank creates every pair
            if dist.get_rank() in pair:
                mine = g
        return mine

    def _loss(self, output, target):
        from ..loss import chunked_cross_entropy

        m = self.module
        w = m.head_weight()
        return chunked_cross_entropy(output.reshape(-1, output.shape[-1]), w, target.reshape(-1),
                                     softcap=getattr(m.config, "final_logit_softcapping", None),
                                     chunk_size=self.chunk_size, reduction="sum") / self.n_valid

    def _build(self, seq_len: int, n_microbatches: int, schedule_cls, training: bool):
        # static shapes (one packed row of seq_len tokens per micro-batch): no metadata inference,
        # which would run the stage on meta tensors (our cu_seqlens checks need real values)
        p = next(self.module.parameters())
        dev, dt = p.device, self.dtype or p.dtype
        H = self.module.config.hidden_size
        ids = torch.empty(1, seq_len, dtype=torch.long, device="meta")
        hid = torch.empty(1, seq_len, H, dtype=dt, device="meta", requires_grad=training)
        inputs = (ids, ids) if self.info.is_first else (hid, ids)
        outputs = hid if self.info.is_last else (hid, ids)
        stage = self._stage_cls(self.module, self.pp_rank, self.num_stages, dev, input_args=inputs,
                                output_args=outputs, group=self.pp_group)
        return schedule_cls(stage, n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _run(self, fn, input_ids, doc, labels) -> float:
        losses: list = []
        if self.info.is_first:
            fn(input_ids, doc, target=labels if self.info.is_last else None,
               losses=losses if self.info.is_last else None, return_outputs=False)
        elif self.info.is_last:
            fn(target=labels, losses=losses, return_outputs=False)
        else:
            fn(return_outputs=False)
        total = torch.tensor([float(sum(float(l.detach()) for l in losses))], dtype=torch.float64)
        if self.num_stages > 1:  # the last stage knows the loss: share it with the pipeline
            last = dist.get_global_rank(self.pp_group, self.num_stages - 1)
            dist.broadcast(total, src=last, group=self.pp_group)
        return total.item()

    def step(self, input_ids: torch.Tensor, doc: torch.Tensor, labels: torch.Tensor, n_valid: int) -> float:
        """Forward and backward of ``n_microbatches`` rows; the summed loss (every pipeline rank)."""
        if input_ids.shape[0] != self.n_microbatches:
            raise ConfigError(f"pipeline parallel: {input_ids.shape[0]} rows given, the schedule was built for "
                              f"{self.n_microbatches} micro-batches")
        if self._schedule is None:
            self._schedule = self._build(input_ids.shape[-1], self.n_microbatches, self._schedule_cls, True)
        self.n_valid = max(int(n_valid), 1)
        return self._run(self._schedule.step, input_ids, doc, labels)

    @torch.no_grad()
    def eval_loss_sum(self, input_ids: torch.Tensor, doc: torch.Tensor, labels: torch.Tensor) -> float:
        """Forward only (a GPipe schedule per row count): the SUM of the token losses of the rows."""
        key = tuple(input_ids.shape)
        if key not in self._eval_schedules:
            self._eval_schedules[key] = self._build(key[-1], key[0], self._gpipe_cls, False)
        saved, self.n_valid = self.n_valid, 1
        try:
            return self._run(self._eval_schedules[key].eval, input_ids, doc, labels)
        finally:
            self.n_valid = saved

    def tied_parameter(self):
        if self._tied_group is None:
            return None
        return self.module.model.embed_tokens.weight

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the tied embedding/head gradient over the first and last stage (both copies then step alike)."""
        p = self.tied_parameter()
        if p is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(_local(p.grad), group=self._tied_group)

    def owner_factor(self, p) -> int:
        """For ``grad_norm``: the tied weight lives on two stages, count it once."""
        return 2 if p is self.tied_parameter() else 1


def pipeline_batch(rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(input_ids, doc, labels, num_valid)`` for ``Pipeline.step`` from packed rows (one row per micro-batch)."""
    ids = torch.stack([r.input_ids for r in rows])
    labels = torch.stack([r.labels for r in rows])
    doc = torch.cat([row_segments(r.cu_seqlens, r.seq_len) for r in rows])
    return ids, doc, labels, int((labels != -100).sum())


def row_segments(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token segment ids ``[1, T]`` of one packed row (what ``Pipeline.step`` takes as ``doc``)."""
    cu = cu_seqlens.to(torch.long)
    return torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1], output_size=total)[None]
