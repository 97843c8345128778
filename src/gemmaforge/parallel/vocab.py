"""Vocabulary parallelism over the FSDP mesh: the ``[V, H]`` tables stay sharded by vocabulary rows.

Under FSDP2 the token embedding, the (tied) LM head and Gemma 4's per-layer embedding table are not
all-gathered: each table is a ``DTensor`` ``Shard(0)`` over the FSDP mesh (``dp_shard x cp``), so
rank ``r`` of ``P`` holds rows ``[r V/P, (r+1) V/P)`` for the whole step, and FSDP ignores it
(``apply_fsdp``). Each use exchanges what is small (token ids, hidden states, per-token statistics)
and never forms a ``[V, H]`` tensor on one rank:

* **lookup** (``VocabParallelEmbedding``): the group's token ids are all-gathered, every rank looks
  up the rows it holds (zeros elsewhere), the partial rows are summed over the group and each rank
  keeps its own tokens (exactly one rank contributes each row, so the sum is exact). Backward: the
  rows' gradients are all-gathered and each rank adds those of its rows into its shard of the
  gradient, in place (a tied weight's gradient already holds the head's part).
* **training loss** (``VocabParallelLMHead.cross_entropy``, Megatron-style vocab-parallel
  cross-entropy): the group's hidden states and labels are all-gathered (``[tokens x P, H]``),
  each rank forms the logits of its vocabulary slice in chunks and the per-token log-sum-exp is
  combined over the ranks (one all-gather of ``(max, sum exp, target logit)`` per chunk); as in
  ``ops.head_loss``'s fused loss the gradients come out of the same pass: the weight gradient is the
  rank's own shard (every token of the group contributes to it here, so it needs no reduction), the
  hidden-state gradients are summed over the group and each rank keeps its tokens. Backward scales
  them by the upstream gradient when it is the same on every rank (the trainer's ``loss / global
  count``); otherwise (``reduction="mean"`` with different counts, ``"none"``, any other weighting)
  it recomputes the chunks with per-token coefficients (exact either way). The logits of the first
  ``min(tokens, H)`` rows are formed inside the ``[V/P, H]`` gradient buffer (see
  ``ops.head_loss._ce_chunk``), the rest ``chunk_size`` rows at a time in a ``[V/P, chunk]`` buffer.
* **logits, log-probs** (``LMHead.forward`` / ``logprobs``, e.g. ``gemmaforge.rl.score``) and
  ``matrix()`` / ``table()``: the correct but memory-hungry fallback. The full ``[V, H]`` weight is
  all-gathered for the call (its gradient summed over the group and sliced back), as FSDP did.

Every call is collective over the FSDP group: each rank must make the same calls in the same order
(and run the backward of each), which FSDP requires anyway. Parameter names, state-dict keys and
global shapes are unchanged (``model.embed_tokens.weight``, the tied ``lm_head.weight``): DCP
``get_state_dict`` / ``set_state_dict``, ``state.full_state_dict``, ``materialize`` and
``grads.grad_norm`` (a ``Shard`` counts once) see an ordinary sharded parameter.

Applies where the table is a plain tensor whose rows divide evenly over the mesh (not under tensor
parallelism, whose replicated tables stay in FSDP's root group as before).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layers.embedding import Embedding, ScaledEmbedding
from ..layers.head import LMHead
from ..ops.head_loss import (
    _ROW_ALIGN,
    _block_rows,
    _check_chunk,
    _check_range,
    _check_softcap,
    _fp32,
    _fp32_region,
    _gemm,
    _is_one,
    _lowp_gemm_dtype,
    _vocab_blocks,
)

IGNORE_INDEX = -100
_LABELS_EXACT = 1 << 24  # labels travel as fp32 beside their hidden state: exact below 2^24


class VocabShard:
    """This rank's rows ``[lo, hi)`` of a ``[vocab, ...]`` table sharded over ``mesh`` (1-D, the FSDP mesh)."""

    def __init__(self, mesh, vocab: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.vocab = int(vocab)
        self.rows = self.vocab // self.size
        self.lo = self.rank * self.rows
        self.hi = self.lo + self.rows

    def __repr__(self) -> str:
        return f"rows {self.lo}:{self.hi} of {self.vocab} (rank {self.rank}/{self.size})"


# ----------------------------------------------------------------------------- collectives

def _all_gather(t: torch.Tensor, sh: VocabShard) -> list[torch.Tensor]:
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(sh.size)]
    dist.all_gather(parts, t, group=sh.group)
    return parts


def _counts(n: int, sh: VocabShard, device) -> list[int]:
    return [int(x) for x in torch.cat(_all_gather(torch.tensor([n], dtype=torch.int64, device=device), sh))]


def _gather_rows(x: torch.Tensor, sh: VocabShard, counts: list[int] | None = None):
    """Every rank's rows of ``x`` (``[n_r, ...]``, ``n_r`` may differ), concatenated in rank order; and the counts."""
    if counts is None:
        counts = _counts(x.shape[0], sh, x.device)
    nmax = max(counts)
    if x.shape[0] < nmax:
        x = torch.cat([x, x.new_zeros(nmax - x.shape[0], *x.shape[1:])])
    parts = _all_gather(x, sh)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


def _sum_mine(partial: torch.Tensor, counts: list[int], sh: VocabShard) -> torch.Tensor:
    """Sum ``partial`` (``[sum n_r, ...]``, in rank order) over the group, in place; this rank's rows."""
    dist.all_reduce(partial, group=sh.group)
    off = sum(counts[: sh.rank])
    return partial[off: off + counts[sh.rank]]


def _local_grad(param: nn.Parameter, sh: VocabShard) -> torch.Tensor:
    """The local shard of ``param.grad`` (a zero ``Shard(0)`` DTensor gradient is created when there is none)."""
    from torch.distributed.tensor import DTensor, Shard

    if param.grad is None:
        z = torch.zeros((sh.rows, *param.shape[1:]), dtype=param.dtype, device=param.to_local().device)
        param.grad = DTensor.from_local(z, sh.mesh, [Shard(0)], run_check=False, shape=param.shape,
                                        stride=param.stride())
    return param.grad.to_local()


class _GatherRows(torch.autograd.Function):
    """All-gather the row shards into the full table; backward: sum the gradient over the group, keep our rows."""

    @staticmethod
    def forward(ctx, local, sh: VocabShard):
        ctx.sh = sh
        return torch.cat(_all_gather(local, sh))

    @staticmethod
    def backward(ctx, g):
        sh = ctx.sh
        if dist.get_backend(sh.group) == "nccl":
            chunks = [c.contiguous() for c in g.chunk(sh.size, 0)]
            out = torch.empty_like(chunks[sh.rank])
            dist.reduce_scatter(out, chunks, group=sh.group)
            return out, None
        g = g.contiguous().clone()
        dist.all_reduce(g, group=sh.group)
        return g[sh.lo:sh.hi].clone(), None


def full_table(param: nn.Parameter, sh: VocabShard) -> torch.Tensor:
    """The whole ``[V, ...]`` table as a plain tensor (collective, differentiable: its gradient is
    summed over the group into ``param``'s shard). The memory-hungry fallback."""
    return _GatherRows.apply(param.to_local(), sh)


# ----------------------------------------------------------------------------- embedding

class _VocabLookup(torch.autograd.Function):
    """This rank's ``embedding(ids)`` rows from a vocabulary-sharded table (see the module doc).

    ``weight`` enters detached; ``anchor`` (an empty tensor requiring grad) puts the output in the
    graph. The backward adds the rows' gradient into the parameter's gradient shard in place."""

    @staticmethod
    def forward(ctx, ids, weight, anchor, module):
        sh = module.shard
        ids_all, counts = _gather_rows(ids, sh)
        loc = ids_all - sh.lo
        own = (loc >= 0) & (loc < weight.shape[0])
        rows = F.embedding(loc.clamp(0, weight.shape[0] - 1), weight)
        rows.masked_fill_(~own[:, None], 0)
        ctx.save_for_backward(loc, own)
        ctx.counts, ctx.module = counts, module
        return _sum_mine(rows, counts, sh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        loc, own = ctx.saved_tensors
        m = ctx.module
        sh = m.shard
        w = m.weight
        g_all, _ = _gather_rows(g.to(w.dtype), sh, ctx.counts)
        if m.padding_idx is not None:
            own = own & (loc != m.padding_idx - sh.lo)  # nn.Embedding: the padding row gets no gradient
        sel = own.nonzero().squeeze(1)
        _local_grad(w, sh).index_add_(0, loc.index_select(0, sel), g_all.index_select(0, sel))
        return None, None, None, None


class VocabParallelEmbedding(Embedding):
    """A token embedding whose ``weight`` is a ``Shard(0)`` DTensor over the FSDP mesh (vocabulary rows).

    ``forward(ids)`` equals ``Embedding`` / ``ScaledEmbedding``'s (``scale``: Gemma's multiplier, None
    for a plain embedding); collective over the group. ``compute_dtype`` (FSDP mixed precision's
    ``param_dtype``): the rows and the multiplier are cast to it, as FSDP's cast weight would give."""

    shard: VocabShard
    scale: float | None = None
    compute_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, emb: nn.Embedding, shard: VocabShard, weight: nn.Parameter,
           compute_dtype: torch.dtype | None = None) -> "VocabParallelEmbedding":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim, new.padding_idx = emb.num_embeddings, emb.embedding_dim, emb.padding_idx
        new.max_norm, new.norm_type, new.scale_grad_by_freq, new.sparse = None, 2.0, False, False
        new.scale = emb.scale if isinstance(emb, ScaledEmbedding) else None
        new.shard, new.compute_dtype = shard, compute_dtype
        new.weight = weight
        return new

    def reset_parameters(self) -> None:  # initialised by ``parallel.init.materialize``
        pass

    def _dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight.dtype

    def factor(self) -> torch.Tensor | None:
        """The multiplier actually applied: ``scale`` rounded to the compute dtype (None: no scale)."""
        if self.scale is None:
            return None
        return torch.tensor(self.scale, dtype=torch.float32).to(self._dtype())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight.to_local().detach()
        train = torch.is_grad_enabled() and self.weight.requires_grad
        anchor = torch.empty(0, device=w.device, requires_grad=train)
        rows = _VocabLookup.apply(ids.reshape(-1), w, anchor, self)
        rows = rows.to(self._dtype())
        f = self.factor()
        if f is not None:
            rows = rows * f.to(rows.device)
        return rows.view(*ids.shape, rows.shape[-1])

    def table(self) -> torch.Tensor:
        """The whole ``[V, H]`` table, unscaled (collective; the memory-hungry fallback)."""
        return full_table(self.weight, self.shard)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, vocabulary-parallel {self.shard}"
        return s + (f", scale={self.scale}" if self.scale is not None else "")


# ----------------------------------------------------------------------------- LM head

def _vp_chunk(h_c, wc, y_c, sh: VocabShard, softcap, zt, tile, lse_c, loss_c, gh_out, gw_out, accumulate: bool,
              lowp, row_scale=None, known_lse: bool = False) -> None:
    """One chunk of the vocabulary-parallel loss: ``ops.head_loss._ce_chunk`` over this rank's slice
    ``wc [V/P, H]``, with the log-sum-exp and the target logit combined over the group.

    ``h_c [C, H]``: hidden states of the group's tokens, ``y_c [C]`` their (global) labels. Writes
    ``lse_c`` and ``loss_c`` (unless ``known_lse``: ``lse_c`` holds the forward's), and, with
    ``gh_out`` / ``gw_out``, this slice's part of ``d loss / d h_c`` (to be summed over the group) and
    (+)= ``d loss / d wc``, each token's row scaled by ``row_scale`` when given. ``zt`` may share the
    memory of ``gw_out``'s first ``V/P * C`` floats (``C <= H``), as in ``_ce_chunk``."""
    v, c = wc.shape[0], h_c.shape[0]
    block = _block_rows(h_c.device)
    cols = torch.arange(c, device=h_c.device)
    _gemm(wc, h_c.t(), zt, False, lowp)  # raw logits of our slice, [V/P, C]
    scale = 1.0
    if softcap is not None:
        zt.div_(softcap).tanh_()  # t = tanh(z / cap); logits = cap * t
        scale = float(softcap)
    loc = y_c - sh.lo
    if not known_lse:
        own = (loc >= 0) & (loc < v)
        tgt = torch.where(own, zt[loc.clamp(0, v - 1), cols] * scale, 0.0)
        m = torch.full((c,), float("-inf"), dtype=torch.float32, device=h_c.device)
        s = torch.zeros(c, dtype=torch.float32, device=h_c.device)
        for b0, b1, t in _vocab_blocks(v, block, c, tile):
            zb = zt[b0:b1]
            if scale != 1.0:
                zb = torch.mul(zb, scale, out=t)
            m_new = torch.maximum(m, zb.amax(dim=0))
            s.mul_(torch.exp(m - m_new))
            torch.sub(zb, m_new, out=t)
            s += t.exp_().sum(dim=0)
            m = m_new
        st = torch.stack(_all_gather(torch.stack([m, s, tgt]), sh))  # [P, 3, C]
        top = st[:, 0].amax(dim=0)
        lse_c.copy_(top + (st[:, 1] * torch.exp(st[:, 0] - top)).sum(dim=0).log())
        loss_c.copy_(lse_c - st[:, 2].sum(dim=0))
    if gh_out is None and gw_out is None:
        return
    lse = lse_c
    for i, (b0, b1, p) in enumerate(_vocab_blocks(v, block, c, tile, reverse=True)):
        zb = zt[b0:b1]
        if scale != 1.0:
            torch.mul(zb, scale, out=p).sub_(lse)
        else:
            torch.sub(zb, lse, out=p)
        p.exp_()  # softmax over the whole vocabulary (the global log-sum-exp), our rows of it
        hit = ((loc >= b0) & (loc < b1)).to(p.dtype)
        p.index_put_(((loc - b0).clamp_(0, b1 - b0 - 1), cols), hit.neg_(), accumulate=True)
        if softcap is not None:
            p.mul_(zb.square().neg_().add_(1.0))  # read before the gradient overwrites zb
        if row_scale is not None:
            p.mul_(row_scale)
        pg = p if lowp is None else p.to(lowp)
        if gh_out is not None:
            _gemm(pg.t(), wc[b0:b1], gh_out, i > 0, lowp)
        if gw_out is not None:
            _gemm(pg, h_c, gw_out[b0:b1], accumulate, lowp)


def _vp_passes(hc, wc, y, sh, softcap, chunk_size, lowp, lse, losses, gh, gw, row_scale=None,
               known_lse: bool = False) -> None:
    """Every chunk of the group's ``hc [M, H]`` (``_FusedCrossEntropy.forward``'s loop): the first
    ``min(M, H)`` rows form their logits inside ``gw`` when it is wanted, the rest go through one
    ``[V/P, chunk]`` workspace."""
    m, hdim = hc.shape
    v = wc.shape[0]
    dev = hc.device
    first = min(m, hdim) if gw is not None else 0
    tile = torch.empty(min(_block_rows(dev), v) * max(min(m, max(first, chunk_size)), 1), dtype=torch.float32,
                       device=dev)
    ws = None
    s = 0
    while s < m:
        if s == 0 and first:
            e = first
            zt = gw.view(-1)[: v * e].view(v, e)
        else:
            e = min(s + chunk_size, m)
            if ws is None:
                ws = torch.empty(v * min(chunk_size, m - s), dtype=torch.float32, device=dev)
            zt = ws[: v * (e - s)].view(v, e - s)
        _vp_chunk(hc[s:e], wc, y[s:e], sh, softcap, zt, tile, lse[s:e], losses[s:e] if losses is not None else None,
                  gh[s:e] if gh is not None else None, gw, s > 0, lowp,
                  row_scale[s:e] if row_scale is not None else None, known_lse)
        s = e
    if gw is not None and m == 0:
        gw.zero_()


class _VocabParallelCE(torch.autograd.Function):
    """Token cross-entropy of this rank's (valid) rows through a vocabulary-sharded head (module doc).

    ``per_token=False``: returns the fp32 sum over this rank's rows, gradients computed in the forward;
    ``per_token=True``: the per-row losses, gradients recomputed in the backward."""

    @staticmethod
    @_fp32_region
    def forward(ctx, h, weight, y, sh, softcap, chunk_size, need_gh, need_gw, per_token, lowp):
        n, hdim = h.shape
        dev = h.device
        hy = torch.cat([_fp32(h.detach()), y.to(torch.float32)[:, None]], dim=1)
        allhy, counts = _gather_rows(hy, sh)  # the group's tokens, rank by rank
        m_in = allhy.shape[0]
        m = -(-m_in // _ROW_ALIGN) * _ROW_ALIGN  # zero rows (label 0) to a multiple of 8: see head_loss
        if m != m_in:
            allhy = torch.cat([allhy, allhy.new_zeros(m - m_in, hdim + 1)])
        hc = allhy[:, :hdim].contiguous()
        yall = allhy[:, hdim].long()
        del allhy, hy
        wc = _fp32(weight) if lowp is None else weight.to(lowp)
        hcc = hc if lowp is None else hc.to(lowp)
        lse = torch.empty(m, dtype=torch.float32, device=dev)
        losses = torch.empty(m, dtype=torch.float32, device=dev)
        fused = not per_token
        gh = torch.empty((m, hdim), dtype=torch.float32, device=dev) if fused and need_gh else None
        gw = torch.empty(tuple(weight.shape), dtype=torch.float32, device=dev) if fused and need_gw else None
        _vp_passes(hcc, wc, yall, sh, softcap, chunk_size, lowp, lse, losses, gh, gw)
        del wc
        off = sum(counts[: sh.rank])
        mine = losses[off: off + n]
        ctx.gh = _sum_mine(gh[:m_in], counts, sh).to(h.dtype) if gh is not None else None
        ctx.gw = gw.to(weight.dtype) if gw is not None else None
        ctx.sh, ctx.softcap, ctx.chunk_size, ctx.lowp, ctx.counts = sh, softcap, chunk_size, lowp, counts
        ctx.need_gh, ctx.need_gw, ctx.per_token, ctx.h_dtype = need_gh, need_gw, per_token, h.dtype
        ctx.save_for_backward(hc, yall, lse, weight)
        ctx.consumed = False
        return mine.clone() if per_token else mine.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_fp32_region
    def backward(ctx, g):
        if ctx.consumed:
            raise RuntimeError("the vocabulary-parallel cross-entropy hands its gradient buffers to autograd on "
                               "the first backward; it cannot be back-propagated twice (retain_graph)")
        ctx.consumed = True
        sh, counts = ctx.sh, ctx.counts
        gh, gw = ctx.gh, ctx.gw
        ctx.gh = ctx.gw = None
        nothing = (None,) * 8
        if not (ctx.need_gh or ctx.need_gw):
            return (None, None) + nothing
        if not ctx.per_token:
            gs = torch.cat(_all_gather(g.detach().reshape(1).to(torch.float64), sh))  # every rank's upstream gradient
            if bool((gs == gs[0]).all()):  # the trainer's loss / global count: scale what the forward computed
                if not _is_one(g):
                    if gh is not None:
                        gh.mul_(g.to(gh.dtype))
                    if gw is not None:
                        gw.mul_(g.to(gw.dtype))
                return (gh, gw) + nothing
            del gh, gw
            row_scale = torch.repeat_interleave(gs.to(torch.float32), torch.tensor(counts, device=gs.device))
        else:
            row_scale, _ = _gather_rows(g.detach().to(torch.float32), sh, counts)
        # per-token coefficients (different upstream gradients on different ranks): recompute the chunks
        hc, yall, lse, weight = ctx.saved_tensors
        m_in = row_scale.shape[0]
        if hc.shape[0] != m_in:
            row_scale = torch.cat([row_scale, row_scale.new_zeros(hc.shape[0] - m_in)])
        lowp = ctx.lowp
        wc = _fp32(weight) if lowp is None else weight.to(lowp)
        hcc = hc if lowp is None else hc.to(lowp)
        ghp = torch.empty(hc.shape, dtype=torch.float32, device=hc.device) if ctx.need_gh else None
        gw = torch.empty(tuple(weight.shape), dtype=torch.float32, device=hc.device) if ctx.need_gw else None
        _vp_passes(hcc, wc, yall, sh, ctx.softcap, ctx.chunk_size, lowp, lse, None, ghp, gw, row_scale.to(hc.device),
                   known_lse=True)
        gh = _sum_mine(ghp[:m_in], counts, sh).to(ctx.h_dtype) if ghp is not None else None
        return (gh, gw.to(weight.dtype) if gw is not None else None) + nothing


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, sh: VocabShard, *,
                                 softcap: float | None = None, chunk_size: int = 1024, reduction: str = "sum",
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``ops.head_loss.chunked_cross_entropy`` of this rank's ``hidden [..., H]`` / ``labels``, with
    ``weight`` this rank's ``[V/P, H]`` rows of the head (a plain tensor; collective, see the module doc)."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be one of ('sum', 'mean', 'none'), got {reduction!r}")
    chunk_size = _check_chunk(chunk_size)
    softcap = _check_softcap(softcap)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V/P, H] disagree on H: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"labels has {y.numel()} elements but hidden has {h.shape[0]} rows ({tuple(hidden.shape)})")
    y = y.long()
    valid = y != ignore_index
    n_valid = int(valid.sum())
    if n_valid == y.numel():
        idx, h_v, y_v = None, h, y
    else:
        idx = valid.nonzero().squeeze(1)
        h_v, y_v = h.index_select(0, idx), y.index_select(0, idx)
    _check_range(y_v, sh.vocab, "labels")
    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    lowp = _lowp_gemm_dtype(h_v)
    per_token = reduction == "none"
    out = _VocabParallelCE.apply(h_v, weight, y_v, sh, softcap, chunk_size, need_gh, need_gw, per_token, lowp)
    if per_token:
        if idx is not None:
            out = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device).index_copy(0, idx, out)
        return out.view(labels.shape)
    if reduction == "mean":
        out = out / n_valid if n_valid > 0 else out * 0.0 + float("nan")
    return out


class VocabParallelLMHead(LMHead):
    """The LM head over a ``Shard(0)`` (vocabulary rows) weight on the FSDP mesh.

    ``cross_entropy`` (the training loss) is vocabulary-parallel and never forms a ``[V, H]`` tensor;
    ``forward`` (full logits), ``logprobs`` and ``matrix()`` use the all-gathered weight (collective,
    the memory-hungry fallback: ``[V, H]`` for the call, and its ``[V, H]`` gradient in the backward).

    ``trim``: a callable run before a training loss (``reduction`` sum/mean with gradients on), or None;
    the hook a CPU memory policy sets (as ``cpu_policy.CPUHead.trim``: hand the forward's freed heap back
    before the loss's gradient arrives)."""

    shard: VocabShard
    trim = None

    @classmethod
    def of(cls, head: LMHead, shard: VocabShard, weight: nn.Parameter) -> "VocabParallelLMHead":
        new = cls.sharing(head)
        new.shard = shard
        new.weight = weight
        return new

    def matrix(self) -> torch.Tensor:
        return full_table(self.weight, self.shard)

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
                      reduction: str = "sum") -> torch.Tensor:
        if self.trim is not None and reduction != "none" and torch.is_grad_enabled():
            self.trim()
        return vocab_parallel_cross_entropy(hidden, self.weight.to_local(), labels, self.shard, softcap=self.softcap,
                                            chunk_size=chunk_size, reduction=reduction)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vocabulary-parallel {self.shard}"


# ----------------------------------------------------------------------------- apply

def _rows_of(p: nn.Parameter, sh: VocabShard) -> nn.Parameter:
    """``p`` as a ``Shard(0)`` DTensor parameter over ``sh.mesh`` (meta stays meta; a real table keeps our rows)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = tuple(p.shape)
    if p.device.type == "meta":
        local = torch.empty((sh.rows, *shape[1:]), dtype=p.dtype, device="meta")
    else:
        local = p.detach()[sh.lo:sh.hi].contiguous().clone()
    stride = tuple(int(torch.Size(shape[i + 1:]).numel()) for i in range(len(shape)))
    d = DTensor.from_local(local, sh.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
    return nn.Parameter(d, requires_grad=p.requires_grad)


def _eligible(weight, size: int) -> bool:
    from torch.distributed.tensor import DTensor

    return (weight is not None and not isinstance(weight, DTensor) and not isinstance(weight.data, DTensor)
            and weight.dim() == 2 and weight.shape[0] % size == 0 and weight.shape[0] < _LABELS_EXACT)


def _plain_embedding(m) -> bool:
    return isinstance(m, nn.Embedding) and not isinstance(m, VocabParallelEmbedding) and m.max_norm is None \
        and not m.sparse and not m.scale_grad_by_freq


def apply_vocab_parallel(model: nn.Module, fsdp_mesh, compute_dtype: torch.dtype | None = None) -> list:
    """Shard the token embedding, the LM head (tied or not) and Gemma 4's per-layer embedding table by
    vocabulary rows over ``fsdp_mesh``, swapping their modules for the vocabulary-parallel ones (same
    parameter names). Returns the sharded parameters (FSDP must ignore them); ``[]`` where nothing
    applies (a tensor-parallel, replicated table, or rows that do not divide evenly)."""
    size = fsdp_mesh.size()
    if size == 1:
        return []
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    new: dict[int, nn.Parameter] = {}
    shards: dict[int, VocabShard] = {}

    def shard_of(p):
        if id(p) not in new:
            shards[id(p)] = VocabShard(fsdp_mesh, p.shape[0])
            new[id(p)] = _rows_of(p, shards[id(p)])
        return new[id(p)], shards[id(p)]

    for name in ("embed_tokens", "embed_tokens_per_layer"):
        emb = getattr(inner, name, None) if inner is not None else None
        if _plain_embedding(emb) and _eligible(emb.weight, size):
            w, sh = shard_of(emb.weight)
            setattr(inner, name, VocabParallelEmbedding.of(emb, sh, w, compute_dtype))
    if isinstance(head, LMHead) and not isinstance(head, VocabParallelLMHead) and _eligible(head.weight, size):
        w, sh = shard_of(head.weight)  # a tied head finds the embedding's new parameter: still tied
        model.lm_head = VocabParallelLMHead.of(head, sh, w)
    return list(new.values())
