"""Pipeline parallelism: stages split on decoder-layer boundaries, GPipe / 1F1B schedules from
``torch.distributed.pipelining``.

A stage is the model itself with the parts it does not run set to None (the first stage keeps the
embedding, the last the final norm and the head) and the other stages' layers removed, so its
forward is the model's own; ``StageModule`` only adapts the schedule's positional tensors (token ids
or hidden states, and the row's document ids) to the model's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .dims import LayoutError, ParallelState, mesh_dims, pipeline_schedule_name, pipeline_stage
from .grads import local
from .init import retie


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


class StageModule(nn.Module):
    """What the schedule calls: ``(token ids or hidden states, document ids [1, T])`` -> the stage's
    model on that packed row. Middle stages return ``(hidden, doc)`` so the next stage rebuilds the
    same attention layout; the last stage returns the final-normed hidden states (the objective
    applies the LM head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.info: StageInfo = pipeline_stage(model)

    def forward(self, x: torch.Tensor, doc: torch.Tensor):
        if x.shape[0] != 1:
            raise ConfigError("pipeline parallel: one packed row per micro-batch (micro_batch_rows=1)")
        cu = _cu_from_doc(doc)
        if self.info.is_first:
            h = self.model(x, cu_seqlens=cu, return_hidden=True)
        else:
            h = self.model(inputs_embeds=x, cu_seqlens=cu, return_hidden=True)
        h = h.reshape(1, -1, h.shape[-1])
        return h if self.info.is_last else (h, doc)


def _check_splittable(model: nn.Module) -> None:
    if getattr(model.config, "hidden_size_per_layer_input", 0) or getattr(model.config, "num_kv_shared_layers", 0) \
            or getattr(model.config, "enable_moe_block", False):
        raise LayoutError(f"parallel layout: pipeline parallelism splits models whose blocks pass only the hidden "
                          f"state (Gemma 3, Mistral, Gemma 4 without per-layer inputs or KV sharing); "
                          f"{type(model).__name__} with this config is not supported with --pp")


def build_pipeline_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """Cut ``model`` (meta or real) down to one pipeline stage, in place; parameter names unchanged.

    Stage ``s`` keeps decoder layers ``split_layers(...)[s]`` (their ``ModuleDict`` keys, hence
    ``model.layers.N...`` names, survive), the first stage keeps the embedding, the last the final
    norm and the LM head; the other parts become None. With a tied head the last stage keeps the
    embedding MODULE too (only as the head's weight: it embeds nothing), tied exactly as in the full
    model, so every stage's names, state-dict keys and optimizer-state keys are the full model's
    (``model.embed_tokens.weight`` + ``lm_head.weight``) and a DCP checkpoint moves between PP and
    any other layout. The two copies' gradients are summed by ``Pipeline.sync_tied_grads`` (then
    identical AdamW updates keep them equal).
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
    retie(model)
    model.transforms.parallel = ParallelState(mesh=None, dims=None, config=None, stage=info)
    return model


class Pipeline:
    """One rank's pipeline stage and its schedule (``torch.distributed.pipelining``).

        model = build_meta_model(cfg)
        pipe = Pipeline(model, mesh, schedule="1f1b", n_microbatches=4)    # splits the model
        parallelize(pipe.module, mesh, ParallelConfig())                   # TP / FSDP inside the stage
        materialize(pipe.module, "cpu", state_dict=full_sd, broadcast=True) # rank 0 holds full_sd
        loss = pipe.step(input_ids, doc, targets, loss_fn)                  # forward + backward

    ``input_ids``/``doc``/``targets``: ``[n_microbatches, ...]`` (one packed row per micro-batch;
    ``doc`` the per-token segment ids from ``row_segments``). ``loss_fn(hidden, target)`` turns the
    last stage's hidden states of one micro-batch into its loss, already divided by the step's global
    token count, so gradients are not rescaled by the schedule (``scale_grads=False``). Returns the
    sum of the micro-batches' losses on every rank of the pipeline.

    Schedules: ``"GPipe"`` (all forwards, then all backwards) and ``"1F1B"`` (one forward, one
    backward: at most ``pp`` micro-batches of activations alive; needs ``n_microbatches >= pp``).
    """

    def __init__(self, model: nn.Module, mesh, schedule: str = "1F1B", n_microbatches: int = 1):
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
        self.info: StageInfo = pipeline_stage(self.module)
        self._loss_fn = None
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
        return self._loss_fn(output, target)

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
        stage = self._stage_cls(StageModule(self.module), self.pp_rank, self.num_stages, dev, input_args=inputs,
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

    def step(self, input_ids: torch.Tensor, doc: torch.Tensor, targets: torch.Tensor, loss_fn) -> float:
        """Forward and backward of ``n_microbatches`` rows; the summed loss (every pipeline rank)."""
        if input_ids.shape[0] != self.n_microbatches:
            raise ConfigError(f"pipeline parallel: {input_ids.shape[0]} rows given, the schedule was built for "
                              f"{self.n_microbatches} micro-batches")
        if self._schedule is None:
            self._schedule = self._build(input_ids.shape[-1], self.n_microbatches, self._schedule_cls, True)
        self._loss_fn = loss_fn
        return self._run(self._schedule.step, input_ids, doc, targets)

    @torch.no_grad()
    def eval_step(self, input_ids: torch.Tensor, doc: torch.Tensor, targets: torch.Tensor, loss_fn) -> float:
        """Forward only (a GPipe schedule per row count): the summed ``loss_fn`` of the rows."""
        key = tuple(input_ids.shape)
        if key not in self._eval_schedules:
            self._eval_schedules[key] = self._build(key[-1], key[0], self._gpipe_cls, False)
        self._loss_fn = loss_fn
        return self._run(self._eval_schedules[key].eval, input_ids, doc, targets)

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
        dist.all_reduce(local(p.grad), group=self._tied_group)

    def owner_factor(self, p) -> int:
        """For ``grad_norm``: the tied weight lives on two stages, count it once."""
        return 2 if p is self.tied_parameter() else 1


def row_segments(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Per-token segment ids ``[1, T]`` of one packed row (what ``Pipeline.step`` takes as ``doc``)."""
    cu = cu_seqlens.to(torch.long)
    return torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1], output_size=total)[None]
