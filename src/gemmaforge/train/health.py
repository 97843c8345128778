"""Numerical health for the trainer: detect non-finite gradients cheaply, then find where they start.

Nothing here clamps, zeroes or substitutes a value: a step whose gradients are not finite is for
the trainer to skip, and ``locate_nonfinite`` tells it (and the user) where the first NaN/Inf was
born.

``grad_norm_and_finite(params)``: the gradients' total L2 norm and whether they are all finite, from
one pass, for every layout (the trainer clips with that norm, ``clip_grads_``). Plain gradients of
one process: one fused L2-norm reduction per device (``torch.nn.utils.get_total_norm``, which
propagates NaN and Inf, the norm ``clip_grad_norm_`` clips with) and one host sync; an L2 norm can
also overflow on finite values (elements near 1e19), so a non-finite norm is confirmed with the
max-abs norm (``ord=inf``, which cannot overflow). Sharded gradients (FSDP, TP, EP, pipeline stages):
each element counted once, in float64 (no overflow from fp32 values), summed over the ranks by one
all-reduce (``parallel.grads.grad_norm``), so every rank gets the same norm and verdict.

``locate_nonfinite(model, run_micro_batch)`` re-runs one micro-batch with hooks on every named
submodule and returns the FIRST place, in execution order, where a non-finite value appears
(``locate_in_step``: the same over a step's micro-batches and every rank of a parallel layout):

* ``parameter``:      a parameter itself is already non-finite (checked before running);
* ``input``:          the tensors handed to the model are non-finite;
* ``forward``:        a module's output is non-finite while everything before it was finite. A
                      module's own code between its submodule calls (or after the last one) is
                      blamed on that module: when the input of a submodule is non-finite, the
                      module that was running it produced the value;
* ``loss``:           every module output was finite but the loss is not;
* ``backward``:       the gradient a module's backward sends to its inputs is non-finite while the
                      gradient it received was finite (full backward hooks); when the gradient
                      *arriving* at a module is already non-finite, the nearest enclosing module
                      still in its backward (or the loss, if none) produced it;
* ``parameter-grad``: all activations and activation gradients are finite, but a parameter's
                      accumulated gradient is not.

Every hook is removed and every gradient set to ``None`` afterwards (also before the re-run, so
stale gradients of the failed step cannot be mistaken for new ones).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.grads import grad_norm, local


# ----------------------------------------------------------------------------- cheap check

def _grads_by_device(params) -> dict:
    if isinstance(params, nn.Module):
        params = params.parameters()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce().values()
        by_device.setdefault(g.device, []).append(g)
    return by_device


def _max_abs_finite(by_device: dict) -> bool:
    """Every gradient finite, by the max-abs norm (exact: it cannot overflow on finite values)."""
    flags = [torch.stack(torch._foreach_norm(grads, math.inf, dtype=torch.float32)).isfinite().all()
             for grads in by_device.values()]
    return all(bool(f) for f in flags)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sharded(params: list) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p.grad, DTensor) for p in params if p.grad is not None)


def grad_norm_and_finite(params, owner_factor=None) -> tuple[torch.Tensor | None, bool]:
    """``(total L2 norm of the existing gradients, all finite)``; ``(None, True)`` without gradients on
    any rank. Collective under a parallel layout. ``owner_factor(p)``: how many ranks hold the plain
    parameter ``p`` (pipeline stages' tied weight), for counting it once."""
    params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    if _distributed() or _sharded(params):
        has = torch.tensor([float(any(p.grad is not None for p in params))])
        if _distributed():
            dist.all_reduce(has)
        if not bool(has):
            return None, True
        total = grad_norm(params, 2.0, extra_owner_factor=owner_factor)
        return total, bool(torch.isfinite(total))
    by_device = _grads_by_device(params)
    if not by_device:
        return None, True
    total = torch.nn.utils.get_total_norm([g for grads in by_device.values() for g in grads], 2.0)
    if bool(total.isfinite()):
        return total, True
    return total, _max_abs_finite(by_device)


@torch.no_grad()
def clip_grads_(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients by ``max_norm / (total_norm + 1e-6)`` clamped at 1, as ``clip_grad_norm_``
    does (the local shard of a sharded gradient)."""
    params = [p for p in params if p.grad is not None]
    coef = torch.clamp(float(max_norm) / (total_norm.float() + 1e-6), max=1.0)
    if not _sharded(params):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
        return
    for p in params:
        local(p.grad).mul_(coef.to(local(p.grad).device))


# ----------------------------------------------------------------------------- report

@dataclass
class NonFiniteReport:
    phase: str  # parameter, input, forward, loss, backward or parameter-grad
    where: str  # module name, parameter name, "loss" or "input"
    kind: str  # "nan", "inf" or "nan+inf"
    count: int  # non-finite elements in the offending tensor(s)
    detail: str = ""  # e.g. "its own code, before calling model.layers.0.mlp"
    ok: bool = False  # never True: a clean re-run returns None

    @property
    def message(self) -> str:
        k = f"non-finite ({self.kind})"
        extra = f" ({self.detail})" if self.detail else ""
        if self.phase == "forward":
            return f"{k} in forward of {self.where}{extra}"
        if self.phase == "backward":
            return f"{k} in backward of {'the loss' if self.where == 'loss' else self.where}{extra}"
        if self.phase == "loss":
            return f"{k} in loss{extra}"
        if self.phase == "input":
            return f"{k} in the input of {self.where}{extra}"
        if self.phase == "parameter":
            return f"{k} in parameter {self.where}{extra}"
        return f"{k} in gradient of parameter {self.where}{extra}"

    def __str__(self) -> str:
        return self.message


def _tensors(obj, depth: int = 0):
    """Floating tensors inside an output/argument structure (tuples, lists, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif depth > 4 or obj is None or isinstance(obj, (str, bytes, int, float, bool, nn.Module)):
        return
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name, None), depth + 1)


def _nonfinite(obj) -> tuple[int, int] | None:
    """(nan count, inf count) over the tensors in ``obj``, or None if all finite.

    Detached and under no_grad: ``isfinite`` decomposes into ops (abs) that would otherwise be
    recorded by autograd, saving tensors (and breaking checkpointed blocks' recomputation check).
    """
    with torch.no_grad():
        bad = [t for t in (local(x).detach() for x in _tensors(obj))
               if t.numel() and not bool(torch.isfinite(t).all())]
        if not bad:
            return None
        return sum(int(t.isnan().sum()) for t in bad), sum(int(t.isinf().sum()) for t in bad)


def _kind(nan: int, inf: int) -> str:
    return "nan+inf" if nan and inf else ("nan" if nan else "inf")


# ----------------------------------------------------------------------------- locate

class _Locator:
    def __init__(self, model: nn.Module):
        self.model = model
        self.root = type(model).__name__
        self.modules = [(n, m) for n, m in model.named_modules()]
        self.found: NonFiniteReport | None = None
        self.phase = "forward"
        self.fstack: list[str] = []  # forward: modules currently running (strict nesting)
        self.bopen: dict[str, int] = {}  # backward: modules whose backward has started, not finished
        self.handles = []

    def show(self, name: str) -> str:
        return name or self.root

    def report(self, phase, where, counts, detail=""):
        if self.found is None:
            self.found = NonFiniteReport(phase, where, _kind(*counts), counts[0] + counts[1], detail)

    # ---- forward
    def pre(self, name):
        def hook(mod, args, kwargs):
            if self.phase != "forward":
                return None
            if self.found is None:
                c = _nonfinite((args, kwargs))
                if c is not None:
                    if self.fstack:
                        parent = self.fstack[-1]
                        self.report("forward", self.show(parent), c,
                                    f"its own code, before calling {self.show(name)}")
                    else:
                        self.report("input", self.show(name), c)
            self.fstack.append(name)
            return None

        return hook

    def post(self, name):
        def hook(mod, args, out):
            if self.phase != "forward":
                return None
            if self.fstack and self.fstack[-1] == name:
                self.fstack.pop()
            if self.found is None:
                c = _nonfinite(out)
                if c is not None:
                    self.report("forward", self.show(name), c)
            return None

        return hook

    # ---- backward
    def _enclosing(self, name: str) -> str | None:
        """Nearest ancestor of ``name`` whose backward is in progress."""
        best = None
        for n, k in self.bopen.items():
            if k > 0 and n != name and (n == "" or name.startswith(n + ".")):
                if best is None or len(n) > len(best):
                    best = n
        return best

    def bpre(self, name):
        def hook(mod, grad_output):
            if self.found is None:
                c = _nonfinite(grad_output)
                if c is not None:
                    enc = self._enclosing(name)
                    if enc is None:
                        self.report("backward", "loss", c, f"the gradient reaching {self.show(name)}")
                    else:
                        self.report("backward", self.show(enc), c,
                                    f"its own code, gradient reaching {self.show(name)}")
            self.bopen[name] = self.bopen.get(name, 0) + 1
            return None

        return hook

    def bpost(self, name):
        def hook(mod, grad_input, grad_output):
            if self.bopen.get(name, 0) > 0:
                self.bopen[name] -= 1
            if self.found is None:
                c = _nonfinite(grad_input)
                if c is not None:
                    self.report("backward", self.show(name), c)
            return None

        return hook

    def install(self) -> None:
        for name, m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self.pre(name), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self.post(name)))
            self.handles.append(m.register_full_backward_pre_hook(self.bpre(name)))
            self.handles.append(m.register_full_backward_hook(self.bpost(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def locate_nonfinite(model: nn.Module, run_micro_batch: Callable[[], torch.Tensor],
                     collective: bool = False) -> NonFiniteReport | None:
    """Re-run one micro-batch under hooks; the first non-finite value's origin, or None if clean.

    ``run_micro_batch()`` runs the forward (and the loss) and returns the scalar loss; this
    function calls ``backward`` on it. All hooks are removed and all gradients set to None after.
    ``collective``: the model is sharded over ranks that all run this together, so the forward and
    the backward always run whole (their collectives must meet), whatever is found on the way.
    """
    loc = _Locator(model)
    named_params = list(model.named_parameters())
    try:
        with torch.no_grad():
            for n, p in named_params:
                c = _nonfinite(p)
                if c is not None:
                    found = NonFiniteReport("parameter", n, _kind(*c), sum(c), "before the micro-batch ran")
                    if not collective:
                        return found
                    loc.found = loc.found or found
        model.zero_grad(set_to_none=True)
        loc.install()
        with torch.enable_grad(), warnings.catch_warnings():
            # modules whose inputs need no grad (the embedding, the model itself) are expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            loss = run_micro_batch()
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"run_micro_batch must return the loss tensor; got {type(loss).__name__}")
            loc.phase = "backward"
            if loc.found is not None and not collective:
                return loc.found
            c = _nonfinite(loss.detach())
            if c is not None and loc.found is None:
                loc.found = NonFiniteReport("loss", "loss", _kind(*c), sum(c), "every module output finite")
            if loc.found is not None and not collective:
                return loc.found
            if not loss.requires_grad:
                raise ValueError("run_micro_batch returned a loss that does not require grad")
            loss.backward()
            del loss
        if loc.found is not None:
            return loc.found
        for n, p in named_params:
            if p.grad is not None:
                c = _nonfinite(p.grad)
                if c is not None:
                    return NonFiniteReport("parameter-grad", n, _kind(*c), sum(c), "activation gradients finite")
        return None
    finally:
        loc.remove()
        model.zero_grad(set_to_none=True)


def locate_in_step(model: nn.Module, runs: list[Callable[[], torch.Tensor]], first: int | None) -> tuple:
    """``(report, micro-batch index, rank)`` of the first non-finite value of a step, or ``(None, ...)``.

    ``runs[j]()`` recomputes micro-batch ``j``'s loss; micro-batch ``first`` (this rank's first with a
    non-finite loss, or None) is tried first. Under a parallel layout every rank calls this with as
    many micro-batches: they agree on the order (the smallest ``first`` of any rank), re-run each one
    together and take the first report of the lowest rank that found one.
    """
    collective = _distributed()
    start = len(runs) if first is None else first
    if collective:
        t = torch.tensor([start], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        start = int(t)
    start = 0 if start >= len(runs) else start
    order = [start] + [j for j in range(len(runs)) if j != start]
    for j in order:
        report = locate_nonfinite(model, runs[j], collective=collective)
        if collective:
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, report)
            hit = next(((r, rank) for rank, r in enumerate(reports) if r is not None), None)
            if hit is not None:
                return hit[0], j, hit[1]
        elif report is not None:
            return report, j, 0
    return None, start, 0
