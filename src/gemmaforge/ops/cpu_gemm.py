"""fp32 matrix products on CPU through oneDNN where it is faster than ATen's own (MKL).

ATen multiplies fp32 matrices on CPU with MKL, which runs its AVX2 code on AMD CPUs; oneDNN (in every
x86 PyTorch build, ``torch.ops.mkldnn``) runs the CPU's widest kernels. Measured on an AMD EPYC (Zen 5,
AVX512, 2 threads): a 2048^3 product 227 GFLOP/s through MKL, 511 through oneDNN (430-486 with
transposed operands), bench/RESULTS.md. ``linear`` and ``mm`` take oneDNN's product for plain fp32
CPU tensors where ``onednn_pays()`` (a timed probe, once per process) found it faster, and ATen's
everywhere else (other dtypes and devices, distributed tensors, ``torch.compile``). They are not
differentiable: the fused autograd functions of ``ops`` call them in their forward and backward
(``norm_linear``, ``act_linear``, and ``head_loss``: the LM head's losses and log-probs, through
``mm_into``, which lands the products in kept buffers), and ``Linear`` is a linear layer's autograd
function over them. The sums run in another order than MKL's:
equal within fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_caps import best_times


def ops_present() -> bool:
    """oneDNN's linear ops are in this build (x86 builds with mkldnn)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _probe(m: int = 512, k: int = 1152, n: int = 1152, tries: int = 3) -> float:
    """ATen's ``F.linear`` time / oneDNN's on an ``[m, k] x [n, k]^T`` product, best of ``tries``
    each, alternating: above 1 when oneDNN is faster. ~10 ms."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    with torch.inference_mode():
        aten, onednn = best_times((lambda: F.linear(x, w), lambda: _onednn_linear(x, w, None)), tries)
    return aten / max(onednn, 1e-9)


@functools.lru_cache(maxsize=None)
def onednn_pays() -> bool:
    """True when oneDNN's fp32 product is present and clearly faster than ATen's here (asked once)."""
    if not ops_present():
        return False
    try:
        return _probe() > 1.2
    except RuntimeError:
        return False


def applies(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``linear`` / ``mm`` take oneDNN's product for these operands (None entries ignored)."""
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and type(t) in (torch.Tensor, torch.nn.Parameter)
                and t.numel() > 0 for t in ts)
            and not torch.compiler.is_compiling() and onednn_pays())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (not differentiable through oneDNN: call under no autograd)."""
    if applies(x, weight, bias):
        return _onednn_linear(x, weight.detach(), None if bias is None else bias.detach())
    return F.linear(x, weight, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a [m, k]``, ``b [k, n]`` (either may be a transposed view)."""
    if applies(a, b):
        return _onednn_linear(a, b.detach().t(), None)
    return a @ b


class Linear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with its forward and backward products through ``linear`` / ``mm``.
    ``apply(x, weight, bias)``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return linear_grads(gy, lambda: x, weight, need[0], need[1], ctx.has_bias and need[2])


def linear_grads(gy: torch.Tensor, inputs, weight: torch.Tensor, need_x: bool, need_w: bool, need_b: bool):
    """The gradients ``(x, weight, bias)`` of ``F.linear(x, weight, bias)`` for the output gradient ``gy``
    (None where not needed), the products through ``mm``. ``inputs()`` gives ``x`` (called only for the
    weight's gradient, so an op that recomputes its input does so only then)."""
    gy2 = gy.reshape(-1, gy.shape[-1])
    gx = gw = gb = None
    if need_w:
        x = inputs()
        gw = mm(gy2.t(), x.reshape(-1, x.shape[-1]).to(gy.dtype)).to(weight.dtype)
        del x
    if need_b:
        gb = gy2.sum(0).to(weight.dtype)
    if need_x:
        gx = mm(gy2, weight.to(gy.dtype)).view(*gy.shape[:-1], weight.shape[1])
    return gx, gw, gb


BLOCK_BYTES = 8 << 20  # ``mm_into``: a oneDNN product's fresh result per call (oneDNN has no ``out=``)


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` (2-D). Where oneDNN applies, in blocks whose fresh results stay ``BLOCK_BYTES``,
    each copied or added into ``out``: blocks of ``a``'s rows, of ``b``'s columns, or, for a long
    contraction (the LM head's ``dz @ W`` over the vocabulary), of the contraction itself, summed.
    Else ATen's ``mm(out=)`` / ``addmm_`` (no temporary)."""
    if not applies(a, b, out):
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    m, k = a.shape
    n = b.shape[1]
    if k > 4 * max(m, n):
        step = max(1, BLOCK_BYTES // (4 * max(m, n)))
        for s in range(0, k, step):
            r = mm(a[:, s:s + step], b[s:s + step])
            out.add_(r) if accumulate or s > 0 else out.copy_(r)
        return
    if m >= n:
        step = max(1, BLOCK_BYTES // (4 * n))
        for s in range(0, m, step):
            r, o = mm(a[s:s + step], b), out[s:s + step]
            o.add_(r) if accumulate else o.copy_(r)
        return
    step = max(1, BLOCK_BYTES // (4 * m))
    for s in range(0, n, step):
        r, o = mm(a, b[:, s:s + step]), out[:, s:s + step]
        o.add_(r) if accumulate else o.copy_(r)
