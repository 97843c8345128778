"""Grouped expert GEMMs: a sorted-by-expert gated MLP over (token, expert) pairs with a hand-written backward.

The (token, expert) pairs are sorted by expert id once, so each expert multiplies one contiguous
block of rows; never a loop over tokens. Three ways to run the per-expert GEMMs (``impl``):
``grouped`` (``torch._grouped_mm``, the default on accelerators where the kernel exists),
``padded`` (the default on CPU: experts padded to a common row count inside a few contiguous
buckets, one ``bmm`` per bucket, falling back to segments when routing is too unbalanced) and
``segments`` (one GEMM per non-empty expert). A token's k rows are summed back with a gather and a
sum (autograd through the gathers would scatter-add [k*T, H] rows twice per step), the routing
weight is applied on the narrow [pairs, I] side, and the activations are kept rather than
recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def pick_impl(impl: str, x: torch.Tensor, w_gu: torch.Tensor) -> str:
    """"auto": the grouped kernel on accelerators, bucketed bmm on CPU; "grouped" degrades to segments."""
    if impl == "auto":
        return "grouped" if x.device.type != "cpu" and _grouped_ok(x, w_gu) else "padded"
    if impl == "grouped" and not _grouped_ok(x, w_gu):
        return "segments"
    return impl


def act(g: torch.Tensor) -> torch.Tensor:
    return F.gelu(g, approximate="tanh")


class GroupedExperts(torch.autograd.Function):
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
        a = act(g)
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
