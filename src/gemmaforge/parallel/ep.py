"""Expert parallelism: each rank holds a slice of every MoE layer's experts; (token, expert) pairs travel
to the owning rank and back through differentiable all-to-alls. Applied from outside the model:
``apply_expert_parallel`` swaps each ``Gemma4Experts`` for an ``ExpertParallelExperts`` under the
same parameter names."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..layers.moe import Gemma4Experts
from ..ops.grouped_experts import GroupedExperts, pick_impl
from .dims import parallel_state
from .grads import local


class ExpertParallelExperts(nn.Module):
    """Replaces a ``Gemma4Experts`` under expert parallelism: this rank holds experts
    [rank*E/W, (rank+1)*E/W) under the same parameter names (``gate_up_proj`` / ``down_proj``, local
    slices); tokens stay data-parallel and their (token, expert) pairs travel to the owning rank and
    back through differentiable all-to-alls."""

    def __init__(self, inner: Gemma4Experts, group, mesh=None):
        super().__init__()
        if mesh is not None:
            group = mesh["ep"].get_group()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = inner.num_experts
        if E % self.world:
            raise ValueError(f"num_experts ({E}) is not divisible by the expert-parallel group size ({self.world})")
        self.num_experts = E
        self.local = E // self.world
        lo = self.rank * self.local
        self.intermediate = inner.intermediate
        self.impl, self.pad_tolerance = inner.impl, inner.pad_tolerance
        gu = inner.gate_up_proj.detach()[lo:lo + self.local].clone()
        dn = inner.down_proj.detach()[lo:lo + self.local].clone()
        rg = inner.gate_up_proj.requires_grad, inner.down_proj.requires_grad
        if mesh is not None:  # DTensors of the global [E, ...] tensors: Shard(0) on "ep", Replicate elsewhere
            from torch.distributed.tensor import DTensor, Replicate, Shard

            places = [Shard(0) if n == "ep" else Replicate() for n in mesh.mesh_dim_names]
            gu = DTensor.from_local(gu, mesh, places, run_check=False)
            dn = DTensor.from_local(dn, mesh, places, run_check=False)
        self.gate_up_proj = nn.Parameter(gu, requires_grad=rg[0])
        self.down_proj = nn.Parameter(dn, requires_grad=rg[1])

    def _weights(self):
        """The local expert slices as plain tensors (differentiable ``to_local`` for DTensor parameters)."""
        gu, dn = self.gate_up_proj, self.down_proj
        return (gu.to_local() if hasattr(gu, "to_local") else gu), (dn.to_local() if hasattr(dn, "to_local") else dn)

    def _local_experts(self, x, index, weights):
        gu, dn = self._weights()
        impl = pick_impl("segments" if self.impl == "reference" else self.impl, x, gu)
        return GroupedExperts.apply(x.to(gu.dtype), gu, dn, weights, index, impl, self.pad_tolerance).to(x.dtype)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single  # differentiable

        T, H = x.shape
        k = index.shape[1]
        flat = index.reshape(-1)
        sorted_e, order = torch.sort(flat, stable=True)  # pairs by expert, hence by owning rank
        dest = torch.div(sorted_e, self.local, rounding_mode="floor")
        send_counts = torch.bincount(dest, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        tok = torch.div(order, k, rounding_mode="floor")
        xs = x.index_select(0, tok)  # (S, H) in expert order
        ws = weights.reshape(-1).index_select(0, order)  # (S,)
        ids = (sorted_e - dest * self.local).contiguous()  # expert id local to the owning rank
        R = sum(recv)
        rx = all_to_all_single(xs.new_empty(R, H), xs, recv, send, group=self.group)
        rw = all_to_all_single(ws.new_empty(R), ws.contiguous(), recv, send, group=self.group)
        rid = ids.new_empty(R)
        dist.all_to_all_single(rid, ids, recv, send, group=self.group)
        # every received row is one (token, expert) pair: k = 1 for the local experts
        ry = self._local_experts(rx, rid[:, None], rw[:, None])  # (R, H)
        back = all_to_all_single(ry.new_empty(xs.shape[0], H), ry, send, recv, group=self.group)  # (S, H)
        return x.new_zeros(T, H).index_add_(0, tok, back)


def expert_parallel_modules(model: nn.Module) -> list:
    """The expert-parallel expert modules of ``model`` (after ``apply_expert_parallel``)."""
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def apply_expert_parallel(model: nn.Module, ep_group=None, mesh=None) -> nn.Module:
    """Shard every ``Gemma4Experts`` of ``model`` across ``ep_group`` (in place; returns ``model``).

    ``mesh`` (a DeviceMesh with an ``"ep"`` dim, used instead of ``ep_group``): the expert
    parameters become DTensors of the GLOBAL ``[E, ...]`` tensors, ``Shard(0)`` on ``"ep"`` and
    ``Replicate`` on the mesh's other dims (the data-parallel ranks outside the EP group that hold
    the same experts), so full state dicts, DCP checkpoints and gradient norms see whole tensors.
    Their gradients are NOT reduced across those replicas here (``parallel.sync_expert_grads``).

    Each rank keeps only its slice of the experts under the same names (``...experts.gate_up_proj``
    holds E/W of them, rank r the experts r*E/W ...); router, attention and dense weights stay
    replicated and tokens stay data-parallel, so gradients of replicated weights need the usual
    data-parallel all-reduce (FSDP/DDP over the same ranks) outside this function. Expert
    gradients are complete on their owner: every rank's pairs for an expert come to it.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Gemma4Experts)]
    for name, m in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], ExpertParallelExperts(m, ep_group, mesh))
    return model


def expert_parameters(model: nn.Module) -> list:
    """Parameters of the expert-parallel experts (FSDP leaves them alone; ``sync_expert_grads`` reduces them)."""
    return [p for m in expert_parallel_modules(model) for p in m.parameters()]


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
    grads = [local(p.grad) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    for g in groups:
        dist.all_reduce(flat, group=g)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()
