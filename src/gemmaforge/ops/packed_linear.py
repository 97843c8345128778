"""Linear products over oneDNN's prepacked weights, for decoding on CPU.

Decoding multiplies a few rows (one per live sequence) by every weight, once per new token. ATen's
fp32 ``F.linear`` on CPU calls MKL, which re-packs the weight on every call and, on AMD CPUs, runs
its AVX2 code; oneDNN (in every x86 PyTorch build) multiplies a weight packed once into its own
blocked layout with the CPU's widest kernels. Measured on an AMD EPYC (Zen 5, AVX512, 2 threads),
bench/RESULTS.md: Gemma 3 270M's 262k x 640 head, 16 rows 86 -> 18 ms, one row 24 -> 9.4 ms
(MKL over the column-major decode layout); its 2048 x 640 MLP weights, 16 rows 0.32 -> 0.10 ms.

``packed_decoding()`` turns the packed products on for the forwards inside it (generation's loop);
``linear(x, weight, bias, cache)`` then multiplies over ``cache``'s packed copy of ``weight``, made
on first use and made again when the weight changes (its storage or in-place version counter), and
is ``F.linear`` everywhere else: outside the context, under autograd, for other dtypes or devices,
for distributed (DTensor) weights, under ``torch.compile``, or where ``packing_pays()`` found oneDNN
no faster than ATen's product on this machine. The packed copy costs the weight's size again in
memory while it is kept (``PackedWeight.clear``). Results are those of a different summation
order: equal to ``F.linear`` within fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_caps import best_times
from .cpu_gemm import ops_present as _ops_present

_state = threading.local()


@contextlib.contextmanager
def packed_decoding(enabled: bool = True):
    """Within: ``linear`` multiplies over packed weights where it can (see the module doc)."""
    before = getattr(_state, "on", False)
    _state.on = enabled
    try:
        yield
    finally:
        _state.on = before


def decoding() -> bool:
    return getattr(_state, "on", False)


def _pack(weight: torch.Tensor, rows: int = 16) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _probe(rows: int = 16, n: int = 2048, k: int = 640, tries: int = 5) -> float:
    """ATen's ``F.linear`` time / the packed product's on a decode-like shape (``rows`` x ``k`` times
    a ``[n, k]`` weight), best of ``tries`` each, alternating: above 1 when packing is faster. ~5 ms."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    with torch.inference_mode():
        p = _pack(w, rows)
        aten, packed = best_times((lambda: F.linear(x, w), lambda: _product(x, p, None)), tries, calls=4)
    return aten / max(packed, 1e-9)


@functools.lru_cache(maxsize=None)
def packing_pays() -> bool:
    """True when oneDNN's packed products are present in this build and faster than ``F.linear`` here
    (a timed probe, asked once per process). False where the ops are missing or fail."""
    if not _ops_present():
        return False
    try:
        return _probe() > 1.05
    except RuntimeError:
        return False


def applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether ``linear`` multiplies ``x`` by ``weight`` over a packed copy here and now."""
    return (decoding() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and type(weight.data) is torch.Tensor and weight.dim() == 2 and x.numel() > 0
            and (bias is None or (bias.dtype == torch.float32 and type(bias.data) is torch.Tensor))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                   or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling() and packing_pays())


class PackedWeight:
    """A module's packed copy of one weight (a plain attribute: not a parameter, buffer or state)."""

    def __init__(self):
        self.key = None
        self.packed: Optional[torch.Tensor] = None
        self._watched: set[int] = set()

    def _stale(self, _param) -> None:
        self.key = None  # a gradient arrived: an optimizer (fused AdamW: no version bump) may change it next

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight``, made again when the weight's storage, in-place version, shape
        or strides changed, or a gradient was accumulated into it since (a trained weight: rollouts
        between optimizer steps see each update)."""
        if weight.requires_grad and weight.is_leaf and id(weight) not in self._watched:
            weight.register_post_accumulate_grad_hook(self._stale)
            self._watched.add(id(weight))
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()))
        if self.packed is None or key != self.key:
            self.packed = None  # the old copy goes before the new one is made
            with torch.no_grad():
                self.packed = _pack(weight.detach())
            self.key = key
        return self.packed

    def clear(self) -> None:
        self.key, self.packed = None, None

    # a copied or pickled module starts without a packed copy (oneDNN tensors neither copy nor pickle)
    def __deepcopy__(self, memo):
        return PackedWeight()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           cache: Optional[PackedWeight] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, over ``cache``'s packed weight where that applies (module doc)."""
    if cache is not None and applies(x, weight, bias):
        return _product(x, cache.get(weight), bias)
    return F.linear(x, weight, bias)
