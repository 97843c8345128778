"""Memory-efficient LM-head losses: chunked cross-entropy and chunked log-probs.

The Gemma 3 LM head is ``logits = hidden @ weight.T`` with ``weight [V, H]``
(tied to the token embedding, ``V = 262_144``), optionally followed by final
logit soft-capping ``z = c * tanh(z / c)``.  Materialising ``[N, V]`` fp32
logits (plus the ``log_softmax`` output and its gradient that autograd keeps
around) costs several gigabytes for a few thousand tokens.  The functions here
walk over the tokens ``chunk_size`` rows at a time and never hold more than a
couple of ``[chunk_size, V]`` fp32 buffers, in the forward *and* the backward
pass.

Public API
----------
``chunked_cross_entropy(hidden, weight, labels, *, softcap=None, chunk_size=1024,
reduction="sum", ignore_index=-100)``
    Token cross-entropy of the LM head.  ``"sum"`` (default) returns the fp32
    sum over valid tokens (the trainer divides by the global number of valid
    tokens), ``"mean"`` divides by the local number of valid tokens (``nan``
    when there is none, like ``F.cross_entropy``), ``"none"`` returns the fp32
    per-token losses (0 where ignored).

``chunked_logprobs(hidden, weight, targets, *, softcap=None, temperature=1.0,
chunk_size=1024, return_entropy=False)``
    ``log_softmax(softcap(logits) / temperature)`` gathered at ``targets``
    (fp32), and optionally the entropy of that distribution; differentiable
    through both outputs wrt ``hidden`` and ``weight``.

``naive_cross_entropy`` / ``naive_logprobs``
    Straightforward references that materialise the full logits.

``hidden`` may have leading batch dimensions (``[..., H]``); it is flattened to
``[N, H]``.  Per-token outputs come back in the shape of ``labels``/``targets``.

Design choices
--------------
* **Precision.**  All logit math (matmul output, soft-cap, logsumexp, softmax,
  gradients of the logits) is done in fp32.  Low-precision (bf16/fp16) inputs
  are *upcast* before the matmul: ``hidden`` once (``[N, H]``, cheap) and
  ``weight`` once per call (an fp32 ``[V, H]`` copy; the same size as the fp32
  weight-gradient accumulator, so it does not change the memory order).  This
  gives exact fp32 logits instead of bf16-rounded ones (a logit of 20 would
  otherwise carry a rounding error of ~0.08).  The losses are returned in fp32;
  gradients are returned in the dtype of the respective input, accumulated in
  fp32 over the chunks.
  Exception, the fused cross-entropy under CUDA autocast (bf16/fp16): its three
  GEMMs take operands in the autocast dtype, like every other matmul of an
  autocast step, and accumulate and return fp32 (``torch.mm(out_dtype=)``);
  logits, softmax and gradients stay fp32. (TF32 GEMMs of the 262k head were a
  third of a 1B model's GPU step.)
* **Cross-entropy with ``"sum"``/``"mean"``: fused.**  The scalar loss has a
  scalar upstream gradient, so the gradients wrt ``hidden`` and ``weight`` are
  computed in the *same* pass as the loss (the softmax of the chunk is already
  in hand) and backward only scales them.  That costs 3 ``N x V x H`` matmuls
  (naive autograd also needs 3) and no recomputation, versus 4 for a
  recompute-in-backward scheme.  Peak memory is the same as for recomputation:
  ``O(chunk_size * V)`` for the chunk buffers plus the unavoidable ``[V, H]``
  weight gradient (which exists from the forward until the backward instead of
  only during the backward; when ``loss.backward()`` follows the loss, which is
  where the training peak is, that makes no difference).  Backward scales the
  saved buffers *in place* and hands them to autograd (no second ``[V, H]``
  copy), so the graph of such a loss can be back-propagated only once
  (``retain_graph=True`` followed by a second backward raises a clear error;
  use ``reduction="none"`` + ``.sum()`` if you need that).
* **Cross-entropy with ``"none"`` and log-probs: recompute.**  Per-token
  upstream gradients are arbitrary, so ``weight``'s gradient cannot be
  precomputed.  The forward saves only the per-token logsumexp (and entropy)
  and the backward recomputes each chunk's logits (4 matmuls in all).
* **Ignored labels** (``ignore_index``) are compacted away before the LM head:
  only valid rows are multiplied, so chunks that would contain only ignored
  tokens are never computed, and partially ignored chunks do no wasted work.
* ``weight.requires_grad == False`` (e.g. LoRA) or ``hidden.requires_grad ==
  False`` skip the corresponding gradient matmul; under ``torch.no_grad`` no
  gradient is computed at all.
* Each call allocates its fp32 work buffers once and reuses them for every chunk (in-place ops,
  ``out=`` matmuls). The fused cross-entropy forms each chunk's logits transposed (``[V, C]`` =
  ``W @ h.T``, MKL's fast shape for a row-major ``[V, H]`` table; ``h @ W.T`` is its slowest) and
  walks the vocabulary in blocks of ``_VOCAB_BLOCK`` rows whose softmax tile stays in cache for
  both gradient GEMMs. When the weight gradient is wanted, the first ``min(N, H)`` rows keep their
  logits inside the ``[V, H]`` gradient buffer itself (blocks run in reverse so the gradient only
  overwrites consumed logits): a 512-token step of a 640-wide model needs no ``[chunk, V]`` buffer
  at all. Otherwise one ``[chunk, V]`` buffer (1-3 for the log-probs paths, with soft-cap/entropy).
  The valid rows are padded with zero rows to a multiple of ``_ROW_ALIGN`` (8), so the GEMMs never
  see an odd token count (a 512-token row has 511 labelled tokens; MKL ran its ``[V, 511]`` logits
  GEMM 1.4x slower than ``[V, 512]``); a zero row adds exactly 0 to the weight gradient.
  Peak extra memory is therefore at most ``(1..3) * chunk * V * 4`` bytes plus the ``[V, H]``
  weight gradient; nothing of size ``N * V`` is ever allocated.
* fp32 products on CPU go through ``ops.cpu_gemm`` (oneDNN) where a timed probe finds it faster
  than MKL (on AMD CPUs MKL runs its AVX2 code: Gemma 3 270M's loss 9.9 -> 6.5 s of a 512 x 4
  token step, bench/RESULTS.md); oneDNN has no ``out=``, so ``cpu_gemm.mm_into`` multiplies in blocks
  whose fresh results stay ~32 MiB and copies or adds each into the kept buffer.
* Unused outputs: if only ``hidden``'s gradient is requested via
  ``torch.autograd.grad`` while ``weight.requires_grad`` is True, the fused
  cross-entropy still computes the weight gradient in the forward (it cannot
  know); freeze the weight (``requires_grad_(False)``) to skip it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import functools

import torch
import torch.nn.functional as F

from . import cpu_gemm
from .cpu_caps import native_bf16

__all__ = [
    "chunked_cross_entropy",
    "chunked_logprobs",
    "naive_cross_entropy",
    "naive_logprobs",
]

_REDUCTIONS = ("sum", "mean", "none")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _flatten_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, name: str):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] disagree on H: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(
            f"{name} has {y.numel()} elements but hidden has {h.shape[0]} rows ({tuple(hidden.shape)})"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
    if y.device != h.device or weight.device != h.device:
        raise ValueError("hidden, weight and labels must be on the same device")
    return h, y.long()


def _check_chunk(chunk_size: int) -> int:
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size


def _check_softcap(softcap: Optional[float]) -> Optional[float]:
    if softcap is None:
        return None
    softcap = float(softcap)
    if softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return softcap


def _check_grad_buffer(buf: torch.Tensor, weight: torch.Tensor, lowp: Optional[torch.dtype]) -> None:
    want = (tuple(weight.shape), torch.float32, weight.device)
    got = (tuple(buf.shape), buf.dtype, buf.device)
    if got != want or not buf.is_contiguous() or weight.dtype != torch.float32 \
            or (lowp is not None and weight.device.type != "cpu"):
        raise ValueError(f"weight_grad_buffer must be a contiguous fp32 {list(weight.shape)} tensor on "
                         f"{weight.device} for an fp32 weight (outside CUDA autocast); got {buf.dtype} "
                         f"{list(buf.shape)} on {buf.device} for a {weight.dtype} weight")
    g = weight.grad
    if g is not None and g.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
        raise ValueError("weight_grad_buffer holds weight.grad, which is still in use (a gradient "
                         "accumulates into it); set weight.grad to None first or pass no buffer")


def _check_logits_buffer(b: torch.Tensor, device: torch.device, chunk_size: int, vocab: int) -> None:
    if b.dtype != torch.float32 or b.device != device or not b.is_contiguous() or b.numel() < chunk_size * vocab:
        raise ValueError(f"logits_buffer must be a contiguous fp32 tensor on {device} with at least "
                         f"chunk_size * V = {chunk_size} * {vocab} elements; got {b.dtype} {list(b.shape)} "
                         f"on {b.device}")


def _check_range(y: torch.Tensor, vocab: int, name: str) -> None:
    if y.numel() and bool(((y < 0) | (y >= vocab)).any()):
        bad = y[(y < 0) | (y >= vocab)][:5].tolist()
        raise IndexError(f"{name} out of range [0, {vocab}): e.g. {bad}")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _is_one(scale: torch.Tensor) -> bool:
    # Only inspect the value when it is free to do so (no device sync).
    return scale.device.type == "cpu" and scale.numel() == 1 and float(scale) == 1.0


def _fp32_region(fn):
    """Run an autograd.Function's forward/backward with autocast off: the loss math is fp32 by design,
    and under a caller's bf16 autocast ``torch.mm`` would otherwise return bf16 chunks."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(ctx, *args)

    return wrapper


class _Workspace:
    """Up to three ``[chunk, V]`` fp32 buffers reused by every chunk of a call.

    Allocating a fresh ``[chunk, V]`` tensor per chunk costs page faults (CPU)
    or allocator churn; reusing them also bounds the live chunk memory.
    """

    def __init__(self, rows: int, cols: int, device: torch.device):
        self.rows, self.cols, self.device = rows, cols, device
        self._bufs: list = [None, None, None]

    def get(self, i: int, c: int) -> torch.Tensor:
        if self._bufs[i] is None:
            self._bufs[i] = torch.empty((self.rows, self.cols), dtype=torch.float32, device=self.device)
        return self._bufs[i][:c]  # leading rows: contiguous


# --------------------------------------------------------------------------- #
# fused cross-entropy (sum / mean)
# --------------------------------------------------------------------------- #
_VOCAB_BLOCK = 4096  # CPU: vocabulary rows per softmax/gradient block (a [block, C] fp32 tile stays in cache)
_VOCAB_BLOCK_GPU = 65536  # accelerators: few, large blocks (kernel launches, not cache, are the cost)
_ROW_ALIGN = 8  # token rows are padded to a multiple of this (GEMM row lengths; see _FusedCrossEntropy)


def _block_rows(device: torch.device) -> int:
    return _VOCAB_BLOCK if device.type == "cpu" else _VOCAB_BLOCK_GPU


_OUT_DTYPE_MM: dict = {}


def _lowp_gemm_dtype(h: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Optional[torch.dtype]:
    """The dtype of the fused cross-entropy's GEMM operands, or None (fp32 GEMMs).

    CUDA: the autocast dtype when the caller runs under CUDA autocast and ``torch.mm`` can multiply
    that dtype into fp32 (``out_dtype``). CPU: bf16 when ``h`` is bf16 over an fp32 ``weight`` (the
    hidden states of a bf16-autocast forward of an fp32 model, see ``_cpu_lowp``)."""
    if h.device.type == "cpu":
        return _cpu_lowp(h, weight)
    if h.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return None
    dt = torch.get_autocast_dtype("cuda")
    if dt not in (torch.bfloat16, torch.float16):
        return None
    if dt not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, device=h.device, dtype=dt)
            with torch.autocast("cuda", enabled=False):
                _OUT_DTYPE_MM[dt] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[dt] = False
    return dt if _OUT_DTYPE_MM[dt] else None


def _cpu_lowp(h: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """bf16 when ``h`` is bf16, ``weight`` fp32 and the CPU multiplies bf16 natively
    (``cpu_policy.native_bf16``); else None.

    A CPU bf16-autocast step hands the loss bf16 hidden states (its final norm returns the autocast
    dtype) over the fp32 master weight: its three GEMMs then take bf16 operands like every other
    matmul of the step (the logits are 60% of a 270M step's FLOPs; bf16 multiplied them ~4x faster
    than fp32 on AVX512-BF16). CPU ``torch.mm`` has no fp32 output for bf16 operands (``out_dtype``
    is CUDA-only in torch 2.13), so each product is accumulated in fp32 inside oneDNN and rounded
    once to bf16: the logits carry bf16 rounding (~2^-9 relative, as the operands do), the
    softmax, log-sum-exp, losses and the gradients' accumulation over vocabulary blocks stay fp32.
    Both bf16 (a bf16 model) or both fp32 keep the exact fp32 path."""
    if h.dtype != torch.bfloat16 or weight is None or weight.dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bf16() else None


def _vocab_blocks(v: int, block: int, c: int, tile: torch.Tensor, reverse: bool = False):
    """``(b0, b1, t)`` per block of ``block`` vocabulary rows, ``t`` the ``[b1 - b0, C]`` view of the flat ``tile``."""
    starts = range(0, v, block)
    for b0 in (reversed(starts) if reverse else starts):
        b1 = min(b0 + block, v)
        yield b0, b1, tile[: (b1 - b0) * c].view(b1 - b0, c)


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, lowp: Optional[torch.dtype],
          tmp: Optional[torch.Tensor] = None):
    """``out (+)= a @ b``; with ``lowp`` the operands are in that dtype and the product is accumulated
    in fp32: returned in fp32 on CUDA (``out_dtype``), as autocast's matmuls are; on CPU rounded once
    to ``lowp`` (into ``tmp``, a ``lowp`` buffer of ``out``'s shape, when given) and then added into
    ``out``. An ``out`` of ``a``'s dtype (CPU bf16 logits) takes the product directly."""
    if lowp is None or out.dtype == a.dtype:
        cpu_gemm.mm_into(a, b, out, accumulate)
        return
    if a.device.type == "cpu":
        r = torch.mm(a, b, out=tmp) if tmp is not None else torch.mm(a, b)
    else:
        r = torch.mm(a, b, out_dtype=torch.float32)
    out.add_(r) if accumulate else out.copy_(r)


def _ce_chunk(
    h_c: torch.Tensor,
    wc: torch.Tensor,
    y_c: torch.Tensor,
    softcap: Optional[float],
    zt: torch.Tensor,
    tile: torch.Tensor,
    gh_out: Optional[torch.Tensor],
    gw_out: Optional[torch.Tensor],
    accumulate: bool,
    lowp: Optional[torch.dtype] = None,
    cpu: Optional["_CPULowp"] = None,
) -> torch.Tensor:
    """Token losses of one chunk; writes d(sum loss)/d(hidden) and (+)= d(sum loss)/d(weight).

    ``h_c`` [C, H] fp32, ``wc`` [V, H] fp32, ``y_c`` [C] valid labels, ``tile`` a flat fp32 buffer
    of at least ``min(block, V) * C`` elements. With ``lowp`` (``_lowp_gemm_dtype``) ``h_c`` and
    ``wc`` are in that dtype; on CPU (``cpu``: its bf16 buffers) ``zt`` is bf16 too (the GEMM's own
    output; every pass reads it into fp32) and may share the first ``2 * V * C`` bytes of the fp32
    gradient buffer for ``C <= 2 H`` by the same argument. The logits are formed
    transposed, ``zt = wc @ h_c.T`` [V, C] (the GEMM shape MKL runs fastest; ``h @ W.T`` over the
    row-major table is its slowest), then two passes over vocabulary blocks: the log-sum-exp
    statistics, and, in *reverse* block order, the block's ``softmax - onehot`` in the small
    ``tile`` followed by both gradient GEMMs while the tile is in cache. ``zt`` may share memory with
    the first ``V * C`` elements of ``gw_out`` (``C <= H``): block ``b`` of the gradient overwrites
    floats ``[H*b0, H*b1)``, which only hold logits of rows ``>= b0`` (already consumed, since blocks
    run backwards), so the ``[V, H]`` gradient buffer doubles as the logits buffer.
    """
    v, c = wc.shape[0], h_c.shape[0]
    block = _block_rows(h_c.device)
    cols = torch.arange(c, device=h_c.device)
    _gemm(wc, h_c.t(), zt, False, lowp)  # raw logits, [V, C]
    if softcap is not None:
        zt.div_(softcap).tanh_()  # t = tanh(z / cap): kept for the derivative; logits = cap * t
        scale = float(softcap)
    else:
        scale = 1.0
    tgt = zt[y_c, cols].float() * scale  # (CPU bf16 logits: fp32 from here on)
    # pass 1: online log-sum-exp over the blocks (each block is read while it sits in cache)
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
    lse = m + s.log()
    loss = lse - tgt
    if gh_out is None and gw_out is None:
        return loss
    for i, (b0, b1, p) in enumerate(_vocab_blocks(v, block, c, tile, reverse=True)):
        zb = zt[b0:b1]
        if scale != 1.0:
            torch.mul(zb, scale, out=p).sub_(lse)
        else:
            torch.sub(zb, lse, out=p)
        p.exp_()  # softmax
        # p - onehot, without a host sync: labels outside the block add 0 at a clamped row
        hit = ((y_c >= b0) & (y_c < b1)).to(p.dtype)
        p.index_put_((((y_c - b0).clamp_(0, b1 - b0 - 1)), cols), hit.neg_(), accumulate=True)
        if softcap is not None:
            # d/dz [cap * tanh(z / cap)] = 1 - tanh(z / cap)^2 (read before the gradient overwrites zb)
            p.mul_((zb.square() if zb.dtype == torch.float32 else zb.float().square_()).neg_().add_(1.0))
        if lowp is None:
            pg = p
        elif cpu is None:
            pg = p.to(lowp)
        else:  # CPU: the block's softmax in bf16, and bf16 products, in buffers reused by every block
            pg = cpu.pg[: p.numel()].view(p.shape).copy_(p)
        if gh_out is not None:
            _gemm(pg.t(), wc[b0:b1], gh_out, i > 0, lowp, cpu.gh[:c] if cpu is not None else None)
        if gw_out is not None:
            _gemm(pg, h_c, gw_out[b0:b1], accumulate, lowp,
                  cpu.gw[: (b1 - b0) * h_c.shape[1]].view(b1 - b0, -1) if cpu is not None else None)
    return loss


class _CPULowp:
    """The CPU bf16 path's per-call buffers: a block's softmax (``pg``) and the two gradient products
    (``gh`` [C, H], ``gw`` [block, H]) in bf16, before they are added into the fp32 gradients."""

    def __init__(self, block: int, c: int, hdim: int, dtype: torch.dtype, device: torch.device):
        self.pg = torch.empty(block * c, dtype=dtype, device=device)
        self.gh = torch.empty(c, hdim, dtype=dtype, device=device)
        self.gw = torch.empty(block * hdim, dtype=dtype, device=device)


class _FusedCrossEntropy(torch.autograd.Function):
    """Sum of token losses over (already compacted, all valid) rows.

    Gradients are computed during the forward; backward only scales them. With the weight
    gradient requested, the first ``min(N, H)`` rows form their logits inside the ``[V, H]`` fp32
    gradient buffer (see ``_ce_chunk``), so they need no ``[chunk, V]`` workspace; the remaining
    rows go ``chunk_size`` at a time through one.
    """

    @staticmethod
    @_fp32_region
    def forward(ctx, h, weight, y, softcap, chunk_size, need_gh, need_gw, lowp=None, gw_buffer=None,
                logits_buffer=None, weight_lowp=None):
        n_in, hdim = h.shape
        v = weight.shape[0]
        dev = h.device
        if lowp is None:
            wc = _fp32(weight)
        else:
            wc = weight_lowp if weight_lowp is not None and weight_lowp.dtype == lowp else weight.to(lowp)
        hc = _fp32(h) if lowp is None else h.to(lowp)
        # CPU bf16: the logits are the GEMM's bf16 output (no fp32-output bf16 GEMM on CPU)
        zdt = lowp if lowp is not None and dev.type == "cpu" else torch.float32
        n = -(-n_in // _ROW_ALIGN) * _ROW_ALIGN
        if n != n_in:
            # Zero rows up to a multiple of _ROW_ALIGN: the logits GEMM writes [V, n] rows, and
            # an odd row length (511 for a 512-token row's shifted labels) made MKL's GEMM 1.4x
            # slower. A zero row adds exactly 0 to the weight gradient (its softmax times 0);
            # its loss and hidden gradient are dropped below.
            hc = torch.cat([hc, hc.new_zeros(n - n_in, hdim)])
            y = torch.cat([y, y.new_zeros(n - n_in)])
        losses = torch.empty(n, dtype=torch.float32, device=dev)
        gh = torch.empty((n, hdim), dtype=torch.float32, device=dev) if need_gh else None
        if not need_gw:
            gw = None
        elif gw_buffer is not None:
            gw = gw_buffer.detach()  # its own tensor over the buffer's memory: autograd adopts it, no copy
        else:
            gw = torch.empty((v, hdim), dtype=torch.float32, device=dev)
        per = 4 // zdt.itemsize  # logits per fp32 element of the buffers
        first = min(n, hdim * per) if need_gw else 0
        rows = max(min(n, max(first, chunk_size)), 1)
        block = min(_block_rows(dev), v)
        tile = torch.empty(block * rows, dtype=torch.float32, device=dev)  # flat: viewed [block, C] per chunk
        cpu = _CPULowp(block, rows, hdim, zdt, dev) if zdt != torch.float32 else None
        ws = None
        s = 0
        while s < n:
            if s == 0 and first:
                e = first
                zt = gw.view(-1).view(zdt)[: v * e].view(v, e)
            else:
                e = min(s + chunk_size, n)
                if ws is None:
                    ws = logits_buffer.view(-1).view(zdt) if logits_buffer is not None else \
                        torch.empty(v * min(chunk_size, n - s), dtype=zdt, device=dev)
                zt = ws[: v * (e - s)].view(v, e - s)
            losses[s:e] = _ce_chunk(hc[s:e], wc, y[s:e], softcap, zt, tile, gh[s:e] if need_gh else None,
                                    gw, accumulate=s > 0, lowp=lowp, cpu=cpu)
            s = e
        del wc, hc, ws, tile, cpu
        if need_gw and n == 0:
            gw.zero_()
        # Keep the saved gradients in the inputs' dtypes (halves them for bf16).
        ctx.gh = gh[:n_in].to(h.dtype) if gh is not None else None
        ctx.gw = gw.to(weight.dtype) if gw is not None else None
        ctx.consumed = False
        return losses[:n_in].sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_fp32_region
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError(
                "chunked_cross_entropy(reduction='sum'|'mean') precomputes its gradients in the "
                "forward pass and hands the buffers to autograd on the first backward; it cannot be "
                "back-propagated twice (retain_graph). Use reduction='none' and .sum() instead."
            )
        ctx.consumed = True
        gh, gw = ctx.gh, ctx.gw
        ctx.gh = ctx.gw = None  # drop our references so autograd may steal the buffers
        if not _is_one(grad_out):
            if gh is not None:
                gh.mul_(grad_out.to(gh.dtype))
            if gw is not None:
                gw.mul_(grad_out.to(gw.dtype))
        return gh, gw, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# log-probs / entropy (recompute in backward)
# --------------------------------------------------------------------------- #
def _scaled_logits(h_c, wc, softcap, temperature, keep_tanh: bool, ws: _Workspace):
    """Return ``(z, t)``: ``z = softcap(h_c @ wc.T) / temperature`` in fp32
    (workspace buffer 0 or 1) and, if ``keep_tanh`` and softcap is set,
    ``t = tanh(raw / c)`` (buffer 0; else None)."""
    c = h_c.shape[0]
    z = ws.get(0, c)
    cpu_gemm.mm_into(h_c, wc.t(), z, False)
    t = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if keep_tanh:
            t = z
            z = torch.mul(t, softcap / temperature, out=ws.get(1, c))
        else:
            z.mul_(softcap / temperature)
    elif temperature != 1.0:
        z.div_(temperature)
    return z, t


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    @_fp32_region
    def forward(ctx, h, weight, y, softcap, temperature, chunk_size, want_entropy):
        n = h.shape[0]
        wc = _fp32(weight)
        hc = _fp32(h)
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        ent = torch.empty(n, dtype=torch.float32, device=h.device) if want_entropy else None
        ws = _Workspace(min(chunk_size, n), weight.shape[0], h.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z, _ = _scaled_logits(hc[s:e], wc, softcap, temperature, False, ws)  # buffer 0
            m = z.amax(dim=1, keepdim=True)
            zs = z.sub_(m)  # shifted logits (<= 0): better conditioned entropy
            tgt = zs.gather(1, y[s:e, None]).squeeze(1)
            if want_entropy:
                ez = torch.exp(zs, out=ws.get(1, e - s))
                sumexp = ez.sum(dim=1)
                # sum_j exp(zs_j) * zs_j as a batched dot product (no [C, V] temporary)
                dot = torch.bmm(ez[:, None, :], zs[:, :, None]).view(-1)
                log_s = sumexp.log()
                ent[s:e] = log_s - dot / sumexp
            else:
                log_s = zs.exp_().sum(dim=1).log()
            logp[s:e] = tgt - log_s
            lse[s:e] = m.squeeze(1) + log_s
            del z, zs
        del wc, hc, ws
        ctx.save_for_backward(h, weight, y, lse, ent if want_entropy else None)
        ctx.softcap = softcap
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        if want_entropy:
            return logp, ent
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_fp32_region
    def backward(ctx, g_lp, g_ent=None):
        h, weight, y, lse, ent = ctx.saved_tensors
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_gh or need_gw):
            return None, None, None, None, None, None, None
        softcap, temperature, chunk_size = ctx.softcap, ctx.temperature, ctx.chunk_size
        n = h.shape[0]
        wc = _fp32(weight)
        hc = _fp32(h)
        # Chain rule through "/ temperature": fold 1/T into the per-row coefficients.
        inv_t = 1.0 / temperature
        g_lp = g_lp.float() * inv_t if g_lp is not None else None
        g_ent = g_ent.float() * inv_t if g_ent is not None else None
        gh = torch.empty((n, h.shape[1]), dtype=torch.float32, device=h.device) if need_gh else None
        gw = None
        ws = _Workspace(min(chunk_size, n), weight.shape[0], h.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h_c = hc[s:e]
            z, t = _scaled_logits(h_c, wc, softcap, temperature, True, ws)
            logp = z.sub_(lse[s:e, None])  # log p, in place
            # dz = g_lp * (onehot - p) + g_ent * (-p * (log p + H))
            #    = p * (-g_ent * (log p + H) - g_lp) + g_lp * onehot
            if g_ent is not None:
                p = torch.exp(logp, out=ws.get(2, e - s))
                coef = logp.add_(ent[s:e, None]).mul_(-g_ent[s:e, None])
                if g_lp is not None:
                    coef.sub_(g_lp[s:e, None])
                dz = coef.mul_(p)
                del p
            else:
                dz = logp.exp_().mul_(-g_lp[s:e, None])
            if g_lp is not None:
                dz.scatter_add_(1, y[s:e, None], g_lp[s:e, None])
            if t is not None:
                # d/dz [c * tanh(z / c)] = 1 - tanh(z / c)^2
                dz.mul_(t.square_().neg_().add_(1.0))
            del t
            if need_gh:
                cpu_gemm.mm_into(dz, wc, gh[s:e], False)
            if need_gw:
                if gw is None:
                    gw = torch.empty(wc.shape[0], h_c.shape[1], dtype=torch.float32, device=h_c.device)
                    cpu_gemm.mm_into(dz.t(), h_c, gw, False)
                else:
                    cpu_gemm.mm_into(dz.t(), h_c, gw, True)
            del dz, z, logp
        del wc, hc, ws
        if need_gw and gw is None:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gh = gh.to(h.dtype) if gh is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        return gh, gw, None, None, None, None, None


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    chunk_size: int = 1024,
    reduction: str = "sum",
    ignore_index: int = -100,
    weight_grad_buffer: Optional[torch.Tensor] = None,
    logits_buffer: Optional[torch.Tensor] = None,
    weight_lowp: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T)`` against ``labels`` without
    materialising the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) final hidden states, any float dtype.
        weight: ``[V, H]`` LM-head / tied embedding matrix.
        labels: ``[N]`` (or the leading shape of ``hidden``) target ids;
            ``ignore_index`` entries contribute 0 and get no gradient.
        softcap: final logit soft-cap ``c`` (``z -> c * tanh(z / c)``) or None.
        chunk_size: rows of ``hidden`` processed at a time; peak extra memory is
            about ``chunk_size * V * 4`` bytes times 1 (no soft-cap) or 2, plus
            the ``[V, H]`` weight gradient.
        reduction: ``"sum"`` (fp32 sum over valid tokens), ``"mean"`` (divided
            by the number of valid tokens here) or ``"none"`` (fp32 per-token).
        ignore_index: label value to ignore.
        weight_grad_buffer: optional fp32 ``[V, H]`` tensor on ``weight``'s device (fp32 ``weight``)
            that the fused loss (``"sum"``/``"mean"``) forms its logits and ``weight``'s gradient
            in, instead of a fresh ``[V, H]`` allocation; ``weight.grad`` then shares its memory.
            A training loop passes the same buffer every step (``weight.grad`` set to None in
            between), so the 671 MB gradient of Gemma 3 270M is not re-allocated, and on CPU not
            page-faulted in, each step. It must not hold a gradient still in use.
        logits_buffer: optional contiguous fp32 tensor on ``hidden``'s device with at least
            ``chunk_size * V`` elements, the fused loss's chunk-logits workspace instead of a fresh
            allocation each call (a frozen head, e.g. LoRA: 268 MB for Gemma 3 270M at chunk 256;
            with ``weight_grad_buffer`` only rows beyond the first ``H`` need it). Reused by a
            training loop from step to step.
        weight_lowp: optional ``weight`` already cast to the low-precision GEMM dtype (CPU: bf16
            hidden states over an fp32 weight, see ``_cpu_lowp``), kept by the caller so the
            ``[V, H]`` cast is not repeated; it must hold ``weight``'s current values. Ignored when
            the GEMMs are fp32.

    Returns:
        fp32 scalar (``"sum"``/``"mean"``) or fp32 tensor shaped like ``labels``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    chunk_size = _check_chunk(chunk_size)
    softcap = _check_softcap(softcap)
    h, y = _flatten_inputs(hidden, weight, labels, "labels")
    vocab = weight.shape[0]

    valid = y != ignore_index
    n_valid = int(valid.sum())
    if n_valid == y.numel():
        idx = None
        h_v, y_v = h, y
    else:
        idx = valid.nonzero().squeeze(1)
        h_v, y_v = h.index_select(0, idx), y.index_select(0, idx)  # differentiable wrt h
    _check_range(y_v, vocab, "labels")

    if reduction == "none":
        lp = _ChunkedLogProbs.apply(h_v, weight, y_v, softcap, 1.0, chunk_size, False)
        tok = -lp
        if idx is not None:
            tok = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device).index_copy(0, idx, tok)
        return tok.view(labels.shape)

    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    lowp = _lowp_gemm_dtype(h_v, weight)
    if weight_grad_buffer is not None:
        _check_grad_buffer(weight_grad_buffer, weight, lowp)
    if logits_buffer is not None:
        _check_logits_buffer(logits_buffer, h_v.device, chunk_size, vocab)
    total = _FusedCrossEntropy.apply(h_v, weight, y_v, softcap, chunk_size, need_gh, need_gw, lowp,
                                     weight_grad_buffer if need_gw else None, logits_buffer, weight_lowp)
    if reduction == "mean":
        # nan when nothing is valid, like F.cross_entropy (whose gradients are then 0)
        total = total / n_valid if n_valid > 0 else total * 0.0 + float("nan")
    return total


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``log_softmax(softcap(hidden @ weight.T) / temperature)[targets]`` in fp32,
    chunked over tokens, differentiable wrt ``hidden`` and ``weight``.

    Temperature is applied after soft-capping (as in HF/verl sampling).  With
    ``return_entropy`` also returns the entropy of the same distribution
    (``-sum p log p``), also differentiable.  ``targets`` must all be valid ids
    in ``[0, V)`` (mask padding yourself, e.g. replace it by 0 and ignore the
    output).  Outputs have the shape of ``targets``.
    """
    chunk_size = _check_chunk(chunk_size)
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    softcap = _check_softcap(softcap)
    h, y = _flatten_inputs(hidden, weight, targets, "targets")
    _check_range(y, weight.shape[0], "targets")
    out = _ChunkedLogProbs.apply(h, weight, y, softcap, temperature, chunk_size, bool(return_entropy))
    if return_entropy:
        lp, ent = out
        return lp.view(targets.shape), ent.view(targets.shape)
    return out.view(targets.shape)


# --------------------------------------------------------------------------- #
# naive references (materialise [N, V])
# --------------------------------------------------------------------------- #
def _naive_logits(hidden, weight, softcap):
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = h.float() @ weight.float().t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def naive_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    reduction: str = "sum",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Reference: full fp32 logits, then ``F.cross_entropy``."""
    logits = _naive_logits(hidden, weight, softcap)
    out = F.cross_entropy(logits, labels.reshape(-1).long(), reduction=reduction, ignore_index=ignore_index)
    return out.view(labels.shape) if reduction == "none" else out


def naive_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Reference: full fp32 logits, soft-cap, ``/ temperature``, ``log_softmax``."""
    logits = _naive_logits(hidden, weight, softcap) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    lp = logp_all.gather(1, targets.reshape(-1, 1).long()).squeeze(1).view(targets.shape)
    if not return_entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1).view(targets.shape)
    return lp, ent
