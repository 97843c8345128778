"""One training step's forward and backward, for every layout: ``forward_backward``.

The trainer, the benches and the multi-process tests all run this function. For each micro-batch
the model returns its final hidden states and the objective turns them into a summed loss, divided
by the step's ONE global count (the objective's ``count`` summed over the micro-batches and the
data-parallel ranks), so summing gradients over ranks (FSDP's divide factor 1) and over
micro-batches gives exactly the single-process gradient. How a layout splits the work is data, a
``StepLayout``:

* data parallel / FSDP2 / TP / EP: each rank runs its own micro-batches through the model;
* context parallel (``cp``): each rank runs its shard of every row (the objective's per-token
  targets sliced alike), attention gathering the keys of the whole row;
* pipeline parallel (``pipe``): the schedule runs the micro-batches through the stages and calls the
  same objective on the last stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data.processor import media_inputs
from ..parallel.cp import ContextParallel
from ..parallel.dims import LayoutError, parallel_state
from ..parallel.ep import sync_expert_grads
from ..parallel.pp import Pipeline, row_segments
from ..parallel.process import all_reduce_sum


@dataclass
class StepLayout:
    """How a step's work is split over ranks; the defaults are one process."""

    dp_group: object = None  # ranks that see different rows: the global count sums over them
    loss_group: object = None  # ranks whose partial losses add up to the step's loss (dp_shard x cp)
    cp: ContextParallel | None = None
    pipe: Pipeline | None = None

    @classmethod
    def of(cls, model: nn.Module, pipe: Pipeline | None = None) -> "StepLayout":
        """The layout of a model after ``parallelize`` (a plain model: one process)."""
        st = parallel_state(model)
        if st is None or st.mesh is None:
            return cls(pipe=pipe)
        cp = ContextParallel(st.mesh["cp"]) if st.dims.cp > 1 else None
        return cls(st.dp_group, st.loss_group, cp, pipe)

    def after_backward(self, model: nn.Module) -> None:
        """Gradient reductions the layout owes after every backward of a step: expert gradients over
        their replicas (EP), the tied embedding/head over the first and last stage (PP)."""
        sync_expert_grads(model)
        if self.pipe is not None:
            self.pipe.sync_tied_grads()

    def owner_factor(self) -> Callable | None:
        """For the gradient norm: how many ranks hold a plain parameter (the tied weight under PP)."""
        return self.pipe.owner_factor if self.pipe is not None else None


@dataclass
class StepResult:
    loss: float  # the step's loss: summed over every token that counts, divided by their global count
    count: int  # the global count (every micro-batch and data-parallel rank)
    tokens: int  # tokens processed by the step (every data-parallel rank)
    bad: int | None  # this rank's first micro-batch with a non-finite loss, or None


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def micro_batch_loss(model: nn.Module, batch: dict, objective, layout: StepLayout,
                     autocast: torch.dtype | None = None) -> torch.Tensor:
    """The objective's summed loss of one collated micro-batch (this rank's tokens under CP)."""
    targets = objective.targets(batch)
    kw = {"cu_seqlens": batch["cu_seqlens"]}
    ids = batch["input_ids"]
    if layout.cp is not None:
        part = layout.cp.shard(batch)
        lo, hi = part["span"]
        ids = part["input_ids"]
        kw = {"cu_seqlens": part["cu_seqlens"], "position_ids": part["position_ids"], "cache": part["cache"]}
        targets = {k: t.reshape(-1)[lo:hi] for k, t in targets.items()}
    dev = next(model.parameters()).device
    if batch.get("media"):  # images (audio...) of the batch's documents, read and preprocessed now
        if layout.cp is not None:
            raise LayoutError("context parallelism with media (images, audio) is not supported")
        kw.update({k: v.to(dev) for k, v in media_inputs(batch["media"]).items()})
    with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = model(ids, return_hidden=True, **kw)
    return objective.loss(model, hidden.reshape(-1, hidden.shape[-1]), targets)


def _pack_targets(dicts: list[dict]) -> tuple[torch.Tensor, list[tuple[str, torch.dtype]]]:
    """Per-micro-batch target dicts -> one ``[n, k, T]`` float64 tensor (exact for token ids) for the
    pipeline schedule, and how to unpack it."""
    keys = sorted(dicts[0])
    spec = [(k, dicts[0][k].dtype) for k in keys]
    packed = torch.stack([torch.stack([d[k].reshape(-1).to(torch.float64) for k in keys]) for d in dicts])
    return packed, spec


def _unpack_targets(t: torch.Tensor, spec) -> dict[str, torch.Tensor]:
    t = t.reshape(len(spec), -1)
    return {k: t[i].to(dt) for i, (k, dt) in enumerate(spec)}


def _pipeline_loss(model, batches, objective, layout: StepLayout, count: int, backward: bool,
                   autocast: torch.dtype | None) -> float:
    if any(b.get("media") for b in batches):
        raise LayoutError("pipeline parallelism with media (images, audio) is not supported")
    pipe = layout.pipe
    T = batches[0]["input_ids"].numel()
    dev = next(pipe.module.parameters()).device
    ids = torch.stack([b["input_ids"].reshape(-1) for b in batches]).to(dev)
    doc = torch.cat([row_segments(b["cu_seqlens"], T) for b in batches]).to(dev)
    targets, spec = _pack_targets([objective.targets(b) for b in batches])
    scale = 1.0 / max(count, 1)

    def loss_fn(hidden, target):
        t = _unpack_targets(target, spec)
        return objective.loss(pipe.module, hidden.reshape(-1, hidden.shape[-1]), t) * scale

    with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        run = pipe.step if backward else pipe.eval_step
        return run(ids, doc, targets.to(dev), loss_fn)


def forward_backward(model: nn.Module, batches: list[dict], objective, layout: StepLayout | None = None, *,
                     backward: bool = True, autocast: torch.dtype | None = None) -> StepResult:
    """Run this rank's micro-batches of one step: forward, the objective's loss divided by the step's
    global count, and (``backward``) backward plus the layout's gradient reductions. Collective under
    a parallel layout (every rank calls it with its own micro-batches, as many as the others).

    ``autocast``: a dtype for ``torch.autocast`` around the model's forward (bf16 on CUDA), or None.
    Without ``backward`` (evaluation) call it under ``torch.no_grad()``."""
    layout = layout or StepLayout()
    dev = next(model.parameters()).device
    batches = [_to(b, dev) for b in batches]
    count = all_reduce_sum(sum(objective.count(b) for b in batches), layout.dp_group)
    tokens = all_reduce_sum(sum(int(b["input_ids"].numel()) for b in batches), layout.dp_group)
    bad = None
    if layout.pipe is not None:
        total = _pipeline_loss(model, batches, objective, layout, count, backward, autocast)
        if not math.isfinite(total):
            bad = 0
    else:
        total = 0.0
        for i, b in enumerate(batches):
            loss = micro_batch_loss(model, b, objective, layout, autocast) / max(count, 1)
            if backward:
                loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value) and bad is None:
                bad = i
            total += value
    if backward:
        layout.after_backward(model)
    total = all_reduce_sum(total, layout.dp_group if layout.pipe is not None else layout.loss_group)
    return StepResult(total, count, tokens, bad)
