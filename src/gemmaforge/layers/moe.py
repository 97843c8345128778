"""Mixture of experts: the Gemma 4 router and grouped experts, plus expert parallelism.

Router (exact reference order, ``Gemma4TextRouter``)::

    x = rms(r) * scale * hidden**-0.5        # norm without weight, then a learned scale
    p = softmax(proj(x)) in fp32
    w, idx = topk(p, k);  w /= w.sum(-1);  w *= per_expert_scale[idx]

No auxiliary loss, no capacity limit, no token dropping.

Experts: ``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I] (HF layout, so
checkpoints load unchanged); each (token, expert) pair computes
``down(gelu_tanh(gate(x)) * up(x)) * w`` and a token sums its k pairs.

The (token, expert) pairs are sorted by expert id once, so each expert multiplies one contiguous
block of rows; never a loop over tokens. Three ways to run the per-expert GEMMs (``impl``):
``grouped`` (``torch._grouped_mm``, the default on accelerators where the kernel exists),
``padded`` (the default on CPU: experts padded to a common row count inside a few contiguous
buckets, one ``bmm`` per bucket, falling back to segments when routing is too unbalanced) and
``segments`` (one GEMM per non-empty expert). Forward and backward are written out by hand
(``_GroupedExperts``): a token's k rows are summed back with a gather and a sum (autograd through
the gathers would scatter-add [k*T, H] rows twice per step), the routing weight is applied on the
narrow [pairs, I] side, and the activations are kept rather than recomputed.

``apply_expert_parallel(model, group)`` shards the experts over a process group (all-to-all
token exchange), applied from outside like the other parallelisms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm


class Gemma4Router(nn.Module):
    """Top-k softmax router. forward(x [N, H]) -> (probs [N, E] fp32, weights [N, k], index [N, k])."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float = 1e-6):
        super().__init__()
        self.top_k = top_k
        self.root_size = hidden ** -0.5
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor):
        h = self.norm(x) * self.scale * self.root_size
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # (N, E)
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        w = w / w.sum(dim=-1, keepdim=True)
        w = w * self.per_expert_scale[idx]
        return probs, w, idx


# ----------------------------------------------------------------------------- grouped matmuls

_GROUPED_OK: dict = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (both layouts used here) on this device/dtype; probed once."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(32, 16, device=device, dtype=dtype)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
                y = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)  # forward layout
                y2 = torch._grouped_mm(y, w, offs=offs)  # input-gradient layout
                g = torch._grouped_mm(a.t(), y, offs=offs)  # weight-gradient layout
                ok = all(bool((t.float() == v).all()) for t, v in ((y, 16), (y2, 256), (g, 256)))
                ok = ok and tuple(g.shape) == (2, 16, 16)
            except Exception:  # no kernel for this device / dtype / architecture
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


class _Rows:
    """Where each (token, expert) pair sits in the work buffer, and how to multiply per expert.

    ``grouped`` / ``segments``: rows are the pairs sorted by expert (R = S); one grouped GEMM, or
    one GEMM per non-empty expert segment. ``padded``: experts are split into a few contiguous
    buckets; in a bucket every expert gets the bucket's largest count of rows (zero rows as
    padding) so the bucket is one ``bmm``. Few large calls beat many 500-row GEMMs on CPU (one
    OpenMP region each), as long as the padding stays small (``pad_tolerance``).
    """

    def __init__(self, kind: str, counts: torch.Tensor, pad_tolerance: float = 0.2):
        self.kind = kind
        self.E = counts.numel()
        self.offs = torch.cumsum(counts, 0).to(torch.int32)
        self.bounds = self.buckets = None
        S = self.S = None  # grouped: never read on the host (no device sync)
        if kind != "grouped":
            c = counts.tolist()
            S = self.S = sum(c)
            ends = self.offs.tolist()
            self.bounds = list(zip([0] + ends[:-1], ends))
        if kind == "padded":
            self.buckets = self._plan(c, S, pad_tolerance)
            if self.buckets is None:  # too unbalanced for few buckets: plain segments
                self.kind = "segments"
        if self.kind == "padded":
            # row of each sorted pair: bucket start + (expert - lo) * C + rank inside its expert
            base, r = [], 0
            for lo, hi, C, r0 in self.buckets:
                base += [r0 + (e - lo) * C for e in range(lo, hi)]
                r = r0 + (hi - lo) * C
            self.R = r
            start = torch.tensor([s for s, _ in self.bounds], device=counts.device)
            self.base = torch.tensor(base, device=counts.device)
            self.start = start
        else:
            self.R = S  # None for grouped: as many rows as pairs

    @staticmethod
    def _plan(c, S, tol):
        E = len(c)
        if S == 0:
            return None
        for nb in (1, 2, 4, 8):
            if nb > E or E % nb:
                break
            size = E // nb
            buckets, r0 = [], 0
            for b in range(nb):
                lo, hi = b * size, (b + 1) * size
                C = max(c[lo:hi])
                buckets.append((lo, hi, C, r0))
                r0 += (hi - lo) * C
            if r0 <= (1 + tol) * S:
                return buckets
        return None

    def positions(self, sorted_expert: torch.Tensor) -> torch.Tensor | None:
        """Row of each sorted pair (None: identity)."""
        if self.kind != "padded":
            return None
        n = sorted_expert.numel()
        rank = torch.arange(n, device=sorted_expert.device) - self.start[sorted_expert]
        return self.base[sorted_expert] + rank

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Row block of expert e in x (R, K) times w[e] (K, N) -> (R, N); ``w`` may be a transposed view."""
        if self.kind == "grouped":
            return torch._grouped_mm(x, w, offs=self.offs)
        out = x.new_empty(x.shape[0], w.shape[-1])
        if self.kind == "segments":
            for e, (s, t) in enumerate(self.bounds):
                if t > s:
                    torch.mm(x[s:t], w[e], out=out[s:t])
            return out
        for lo, hi, C, r0 in self.buckets:
            n = (hi - lo) * C
            if n:
                torch.bmm(x[r0:r0 + n].view(hi - lo, C, -1), w[lo:hi], out=out[r0:r0 + n].view(hi - lo, C, -1))
        return out

    def mm_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per expert a_eᵀ b_e: a (R, M), b (R, N) -> (E, M, N); experts without rows get zeros."""
        if self.kind == "grouped":
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        if self.kind == "segments":
            out = a.new_zeros(self.E, a.shape[1], b.shape[1])
            for e, (s, t) in enumerate(self.bounds):
                if t > s:
                    torch.mm(a[s:t].t(), b[s:t], out=out[e])
            return out
        out = a.new_empty(self.E, a.shape[1], b.shape[1])
        for lo, hi, C, r0 in self.buckets:
            n = (hi - lo) * C
            if n:
                torch.bmm(a[r0:r0 + n].view(hi - lo, C, -1).transpose(1, 2), b[r0:r0 + n].view(hi - lo, C, -1),
                          out=out[lo:hi])
            else:
                out[lo:hi].zero_()
        return out


def _grouped_ok(x: torch.Tensor, w_gu: torch.Tensor) -> bool:
    """The grouped kernel needs the kernel and 16-byte-aligned row strides (hidden and expert sizes)."""
    align = 16 // w_gu.element_size()
    sizes_ok = w_gu.shape[1] % (2 * align) == 0 and w_gu.shape[2] % align == 0
    return sizes_ok and grouped_mm_available(x.device, w_gu.dtype)


def _pick_impl(impl: str, x: torch.Tensor, w_gu: torch.Tensor) -> str:
    """"auto": the grouped kernel on accelerators, bucketed bmm on CPU; "grouped" degrades to segments."""
    if impl == "auto":
        return "grouped" if x.device.type != "cpu" and _grouped_ok(x, w_gu) else "padded"
    if impl == "grouped" and not _grouped_ok(x, w_gu):
        return "segments"
    return impl


def _act(g: torch.Tensor) -> torch.Tensor:
    return F.gelu(g, approximate="tanh")


class _GroupedExperts(torch.autograd.Function):
    """Sorted-by-expert gated MLP over (token, expert) pairs with a hand-written backward.

    Pair p = t*k + j (token t's j-th choice) lives in row ``rowpos[p]`` of the work buffer; a
    token's k rows are summed back with one gather and a sum over j (the reference's order), so
    no step scatters [k*T, H] rows into [T, H].
    """

    @staticmethod
    def forward(ctx, x, w_gu, w_d, weights, idx, impl, pad_tolerance):
        T, H = x.shape
        k = idx.shape[1]
        E, I = w_d.shape[0], w_d.shape[2]
        flat = idx.reshape(-1)
        S = flat.numel()
        sorted_e, order = torch.sort(flat, stable=True)  # pairs grouped by expert
        rows = _Rows(impl, torch.bincount(flat, minlength=E), pad_tolerance)
        pos = rows.positions(sorted_e)  # row of each sorted pair (None: row i = sorted pair i)
        arange = torch.arange(S, device=x.device)
        rowpos = torch.empty_like(order).index_copy_(0, order, arange if pos is None else pos)  # (S,)
        R = S if rows.R is None else rows.R
        row_tok = torch.zeros(R, dtype=torch.long, device=x.device).index_copy_(
            0, rowpos, torch.div(arange, k, rounding_mode="floor"))  # token of each row (pads: 0)
        ws = torch.zeros(R, dtype=x.dtype, device=x.device).index_copy_(0, rowpos, weights.reshape(-1).to(x.dtype))
        xs = x.index_select(0, row_tok)  # (R, H)
        if R > S:  # padding rows: zero input and zero weight, never gathered back
            pad = torch.ones(R, dtype=torch.bool, device=x.device).index_fill_(0, rowpos, False)
            xs.index_fill_(0, pad.nonzero().squeeze(1), 0)
        gu = rows.mm(xs, w_gu.transpose(1, 2))  # (R, 2I)
        g, u = gu[:, :I], gu[:, I:]
        a = _act(g)
        hw = torch.mul(a, u).mul_(ws[:, None])  # (R, I); the routing weight on the narrow side
        ys = rows.mm(hw, w_d.transpose(1, 2))  # (R, H)
        out = ys.index_select(0, rowpos).view(T, k, H).sum(1)
        ctx.save_for_backward(xs, w_gu, w_d, gu, a, hw, ws, rowpos, row_tok)
        ctx.rows, ctx.k, ctx.wdtype = rows, k, weights.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        xs, w_gu, w_d, gu, a, hw, ws, rowpos, row_tok = ctx.saved_tensors
        rows, k = ctx.rows, ctx.k
        I = w_d.shape[2]
        need_x, need_gu, need_d, need_w = ctx.needs_input_grad[:4]
        g, u = gu[:, :I], gu[:, I:]
        T, H = dout.shape
        dys = dout.contiguous().index_select(0, row_tok)  # (R, H)
        dW_d = rows.mm_weight(dys, hw) if need_d else None  # (E, H, I)
        dx = dW_gu = dweights = None
        if not (need_x or need_gu or need_w):
            return dx, dW_gu, dW_d, dweights, None, None, None
        dh_w = rows.mm(dys, w_d)  # (R, I) = d(a * u * ws)
        t = dh_w * u
        if need_w:
            dws = (t * a).sum(1)  # (R,)
            dweights = dws.index_select(0, rowpos).view(T, k).to(ctx.wdtype)
        if need_x or need_gu:
            dgu = torch.empty_like(gu)  # (R, 2I): [d gate | d up]
            torch.ops.aten.gelu_backward.grad_input(t.mul_(ws[:, None]), g, approximate="tanh", grad_input=dgu[:, :I])
            torch.mul(dh_w, a, out=dgu[:, I:]).mul_(ws[:, None])
            if need_gu:
                dW_gu = rows.mm_weight(dgu, xs)  # (E, 2I, H)
            if need_x:
                dxs = rows.mm(dgu, w_gu)  # (R, H)
                dx = dxs.index_select(0, rowpos).view(T, k, H).sum(1)
        return dx, dW_gu, dW_d, dweights, None, None, None


class Gemma4Experts(nn.Module):
    """E gated-MLP experts in HF's packed layout. forward(x [N, H], index [N, k], weights [N, k]) -> [N, H].

    ``impl``: "auto", "grouped" (``torch._grouped_mm``), "padded" (a few bucketed ``bmm`` calls,
    falling back to segments when the routing is too unbalanced), "segments" (one GEMM per
    expert), or "reference" (autograd through a loop over experts; the obvious, slow version).
    "auto" takes "grouped" on accelerators where the kernel exists and "padded" on CPU.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "gelu_pytorch_tanh"):
        super().__init__()
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"experts activation {activation!r} is not supported")
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.impl = "auto"
        self.pad_tolerance = 0.2  # "padded": at most 20% extra rows, else per-expert segments

    def resolve_impl(self, x: torch.Tensor) -> str:
        return _pick_impl(self.impl, x, self.gate_up_proj)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        impl = self.resolve_impl(x)
        if impl == "reference":
            return self._reference(x, index, weights)
        xw = x.to(self.gate_up_proj.dtype)
        out = _GroupedExperts.apply(xw, self.gate_up_proj, self.down_proj, weights, index, impl, self.pad_tolerance)
        return out.to(x.dtype)

    def _reference(self, x, index, weights):
        out = torch.zeros_like(x)
        I = self.intermediate
        for e in range(self.num_experts):
            tok, j = torch.where(index == e)
            if tok.numel() == 0:
                continue
            gu = F.linear(x[tok], self.gate_up_proj[e])
            y = F.linear(_act(gu[:, :I]) * gu[:, I:], self.down_proj[e]) * weights[tok, j, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        E, I2, H = self.gate_up_proj.shape
        return f"experts={E}, hidden={H}, intermediate={I2 // 2}, impl={self.impl}"


# ----------------------------------------------------------------------------- expert parallelism

class _ExpertParallelExperts(nn.Module):
    """Replaces a ``Gemma4Experts`` under expert parallelism: this rank holds experts
    [rank*E/W, (rank+1)*E/W) under the same parameter names (``gate_up_proj`` / ``down_proj``, local
    slices); tokens stay data-parallel and their (token, expert) pairs travel to the owning rank and
    back through differentiable all-to-alls."""

    def __init__(self, inner: Gemma4Experts, group, mesh=None):
        super().__init__()
        import torch.distributed as dist

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
        self.first_expert = lo = self.rank * self.local
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
        impl = _pick_impl("segments" if self.impl == "reference" else self.impl, x, gu)
        return _GroupedExperts.apply(x.to(gu.dtype), gu, dn, weights, index, impl, self.pad_tolerance).to(x.dtype)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
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
    return [m for m in model.modules() if isinstance(m, _ExpertParallelExperts)]


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
        setattr(parent, name.rsplit(".", 1)[-1], _ExpertParallelExperts(m, ep_group, mesh))
    return model
