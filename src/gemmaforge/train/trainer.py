"""The trainer: continued pretraining and fine-tuning that never lies about its loss, in one process or
under any parallel layout (FSDP2, TP, CP, PP, EP and their combinations, launched by torchrun).

The path of a token: documents -> packed rows with ``cu_seqlens`` -> this rank's share of the
step's rows -> ``step.forward_backward`` (the model's hidden states -> the objective's summed loss,
divided by the step's global count) -> one health check (the global gradient norm; a non-finite
loss or gradient skips the step and names the module where it started, nothing is clamped) -> clip
-> AdamW -> scheduler -> metrics, evaluation, atomic checkpoints (resumable at any other layout).

Every rank draws the SAME global rows for a step from one ``RowStream`` (so the data position is
layout-independent and resumable at any layout) and keeps its data-parallel share. Rank 0 alone
logs, writes metrics, plots and the final HF export; checkpoints are written by every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import cpu_policy
from ..adapters.lora import LoraConfig, apply_lora, merged_copy
from ..data import Document, load_documents, pack_documents, packing_stats, train_val_split
from ..errors import CheckpointError, ConfigError, DataError, GemmaforgeError
from ..formats.convert import load_any, load_tokenizer
from ..formats.hf import load_into, save_hf
from ..formats.peft import save_adapter
from ..formats.resolve import resolve
from ..models.registry import build_model, load_config
from ..parallel.checkpointing import apply_activation_checkpointing
from ..parallel.compile import compile_blocks
from ..parallel.dims import LayoutError, ParallelConfig, ParallelDims, pipeline_schedule_name
from ..parallel.init import build_meta_model, materialize
from ..parallel.parallelize import parallelize
from ..parallel.pp import Pipeline
from ..parallel.process import get_world_size, init_distributed, is_distributed, is_rank0, rank0_log
from ..parallel.state import full_state_dict
from .checkpointer import checkpoint_step, latest_checkpoint, load_train_state, remove_checkpoints, save_train_state
from .config import SAVE_DTYPES, TrainConfig, absolute_paths, run_dir_of, shard_bytes, write_recipe
from .data import builtin_corpus
from .health import clip_grads_, grad_norm_and_finite, locate_in_step
from .metrics import MetricSinks, plain_line, plot_metrics
from .multimodal import default_lora_targets, freeze_towers, load_processor_for
from .optim import build_optimizer, lr_lambda
from .step import StepLayout, forward_backward, micro_batch_loss
from .tasks import CausalLMTask


class TrainingStopped(GemmaforgeError):
    """Too many consecutive non-finite steps: the run stops with the diagnosis."""


def _from_rank0(value):
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Trainer:
    """Build with a ``TrainConfig`` (and optionally a ready model, tokenizer, documents), then ``run()``.

    ``dims`` / ``parallel``: the parallel layout (``ParallelDims``) and what to apply
    (``ParallelConfig``: activation checkpointing, compile, pipeline schedule, FSDP mixed precision);
    without ``dims`` a process group started by torchrun gets ``ParallelDims()`` (FSDP over every
    rank). ``task``: what the run trains for (``tasks.CausalLMTask``, the default; ``DPOTask``,
    ``GRPOTask``): its data, batch source and objective. ``objective``: replaces the task's. ``model``: a
    ready model (single process) or, under a layout, the full model on rank 0 (other ranks pass
    None); default: loaded from ``cfg.model``.
    """

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, train_docs=None, val_docs=None, log=None,
                 dims: ParallelDims | None = None, parallel: ParallelConfig | None = None, objective=None,
                 task=None):
        cfg.validate()
        self.cfg = cfg
        self.task = task or CausalLMTask()
        init_distributed()
        self.world = get_world_size()
        self.log = rank0_log(log)
        self.pcfg = parallel or ParallelConfig(activation_checkpointing=bool(cfg.activation_checkpointing))
        self.dims = self._check_layout(dims)  # before any data or model is loaded: a wrong layout fails at start
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # --dtype: bf16 autocast (fp32 master weights, norms, softmax, loss) on CUDA, and on a CPU that
        # multiplies bf16 natively (cpu_policy.native_bf16); fp32 elsewhere; forced by bfloat16 / float32
        self.autocast = cpu_policy.training_dtype(cfg.dtype, self.device)
        self.dtype_note = cpu_policy.describe_dtype(cfg.dtype, self.device, self.autocast)
        if self.autocast is not None:
            # the fp32 parts of a bf16 run (the chunked LM-head loss) use TF32 tensor cores, not IEEE fp32
            torch.backends.cuda.matmul.allow_tf32 = True
        if not is_rank0():
            cfg.progress = False
        # the progress bar where stderr is a terminal (or asked for); otherwise one plain line per interval
        self.show_bar = is_rank0() and bool(cfg.progress if cfg.progress is not None else sys.stderr.isatty())
        self.warnings: list[str] = []
        self._created: list[Path] = []  # the run dir and parents this run created (removed if it fails at once)
        self.out = self._prepare_out()
        try:
            self._setup(model, tokenizer, train_docs, val_docs, objective)
        except BaseException:
            self._discard_out()
            raise

    def _setup(self, model, tokenizer, train_docs, val_docs, objective) -> None:
        cfg = self.cfg
        self._set_seed(cfg.seed)
        # tokenizer and data first: bad data fails in a second, before the model loads
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        self._check_context(self._early_context(model))
        self.train_rows, self.val_rows = self.task.load_data(self, train_docs, val_docs)
        self.data_id = self.task.data_id(self)
        self._resolve_steps()
        self.pipe = None
        self.base_id = None  # the frozen weights' identity (LoRA): a checkpoint without them names its base
        self.ref_model = None  # the task's frozen reference policy (DPO/GRPO without LoRA), sharded as the model
        self.model = self._build_model(model)
        self.cpu = cpu_policy.for_training(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg)
        self._anchor: tuple[int, float] | None = None  # where a resumed run with other --steps re-fits the decay
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.layout = StepLayout.of(self.model, self.pipe)
        st = self.model.transforms.parallel
        self.dp_rank = st.dp_rank if st is not None and st.mesh is not None else 0
        self.source, task_objective = self.task.build(self)
        self.objective = objective or task_objective
        self.step = 0
        self.bad_in_a_row = 0
        self.metrics_path = self.out / "metrics.jsonl"
        self._stop_signal: int | None = None
        self.sinks = None
        if cfg.resume:
            self._resume(cfg.resume)

    # ---- setup ----
    def _check_layout(self, dims: ParallelDims | None) -> ParallelDims | None:
        """World size, divisibility and pipeline constraints: one-line LayoutError on every rank."""
        cfg = self.cfg
        if self.world == 1:
            if dims is not None and dims.resolved(1).world_size > 1:
                raise LayoutError(f"parallel layout {dims.resolved(1).describe()} needs several processes: run it "
                                  f"under torchrun")
            return None
        d = (dims or ParallelDims()).validate(self.world, seq_len=cfg.seq_len)
        self.task.check_layout(d)
        rows = cfg.accum * cfg.rows_per_micro_batch
        if rows % d.dp_shard:
            raise LayoutError(f"parallel layout: {rows} rows per step (--batch-tokens {cfg.batch_tokens} / "
                              f"--seq-len {cfg.seq_len}) is not divisible by dp_shard={d.dp_shard}")
        if d.pp > 1:
            sched = pipeline_schedule_name(self.pcfg.pp_schedule)
            n_mb = rows // d.dp_shard
            if sched == "1F1B" and n_mb < d.pp:
                raise LayoutError(
                    f"parallel layout: the 1F1B schedule needs at least pp={d.pp} micro-batches per step, but "
                    f"each pipeline gets {n_mb} row(s) (--batch-tokens {cfg.batch_tokens} / --seq-len "
                    f"{cfg.seq_len} / dp_shard {d.dp_shard}); raise --batch-tokens or use --pp-schedule gpipe")
        if cfg.lora_rank and d.tp > 1:
            raise LayoutError(f"parallel layout: LoRA adapters are not sharded by tensor parallelism yet "
                              f"(--lora-rank with --tp {d.tp}); use FSDP (--dp-shard) instead")
        return d

    def _prepare_out(self) -> Path:
        """Rank 0 probes and creates the run dir; every rank learns its name (or the error)."""
        res = None
        if is_rank0():
            try:
                res = ("ok", str(self._make_out()))
            except ConfigError as e:
                res = ("error", str(e))
        status, value = _from_rank0(res)
        if status == "error":
            raise ConfigError(value)
        return Path(value)

    def _make_out(self) -> Path:
        cfg = self.cfg
        if cfg.out is None and cfg.resume:
            cfg.out = str(run_dir_of(cfg.resume))
        out = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        try:
            self._created = [d for d in (out, *out.parents) if not d.exists()]
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {out}: not writable ({e.strerror or e})") from None
        return out

    def _discard_out(self) -> None:
        """A run that failed before it trained a step leaves no directory behind (only one it created)."""
        if not is_rank0() or not self._created:
            return
        out = self._created[0]
        if (out / "checkpoints").exists() or (out / "final").exists():
            return
        shutil.rmtree(out, ignore_errors=True)
        for d in self._created[1:]:
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def _set_seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _load_tokenizer(self):
        """The model's tokenizer; for a multimodal model its processor (a tokenizer that also reads the
        media parts of chat data into ``Document.media``)."""
        if self.cfg.text_only:
            return load_tokenizer(resolve(self.cfg.model))
        return load_processor_for(resolve(self.cfg.model), load_tokenizer)

    def _load_data(self, train_docs, val_docs):
        """Train and validation rows. ``cfg.val_data`` (files of one's own, same formats as ``data``):
        every one of its documents validates (no ``eval_rows`` cap) and the whole train data trains
        (no split); without it ``val_fraction`` of the documents is held out (``eval_rows`` rows kept)."""
        cfg = self.cfg
        val_paths = [cfg.val_data] if isinstance(cfg.val_data, str) else list(cfg.val_data or [])
        if train_docs is None:
            if cfg.data:
                docs = load_documents(cfg.data, self.tokenizer)
            else:
                tok = self.tokenizer
                docs = [Document(tok.encode(t) + [tok.eos_id]) for t in builtin_corpus()]
            if not docs:
                raise DataError(f"{', '.join(cfg.data) or 'data'}: no documents")
            if val_paths:
                train_docs, val_docs = docs, None
            else:
                train_docs, val_docs = train_val_split(docs, cfg.val_fraction, seed=cfg.seed)
        own_val = bool(val_paths) and val_docs is None
        if own_val:
            val_docs = load_documents(val_paths, self.tokenizer)  # a bad file fails here: file:line
        train_rows = pack_documents(train_docs, cfg.seq_len)
        val_rows = pack_documents(val_docs or [], cfg.seq_len) if val_docs else []
        if not own_val:
            val_rows = val_rows[: cfg.eval_rows]
        st = packing_stats(train_rows)
        src = f" ({len(val_docs)} docs of {', '.join(val_paths)})" if own_val else ""
        self.log(f"data: {len(train_docs)} train docs -> {st}; {len(val_rows)} validation rows{src}")
        return train_rows, val_rows

    def _early_context(self, model) -> int | None:
        """The model's context length before the data is packed, where it is cheap to know (a given
        model, an HF dir's config.json); None otherwise (checked once the model is loaded)."""
        ctx = None
        if is_rank0():
            try:
                if model is not None:
                    ctx = int(model.config.max_position_embeddings)
                else:
                    source = resolve(self.cfg.model)
                    if source.is_dir() and (source / "config.json").is_file():
                        ctx = int(load_config(source).max_position_embeddings)
            except (GemmaforgeError, AttributeError, TypeError, ValueError, OSError):
                ctx = None  # the model load names the problem
        return _from_rank0(ctx)

    def _check_context(self, ctx: int | None) -> None:
        if ctx and self.cfg.seq_len > ctx:
            raise ConfigError(f"--seq-len {self.cfg.seq_len} is longer than the model's context ({ctx} tokens)")

    def _resolve_steps(self) -> None:
        """``--epochs`` into steps; a data set too small for one step is reported (its rows repeat within
        every step)."""
        cfg = self.cfg
        rows, per = len(self.train_rows), self.task.items_per_step(self)
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * rows / per))
            self.log(f"--epochs {cfg.epochs:g}: {cfg.steps} steps ({rows} packed rows, {per} per step)")
        else:
            unit = getattr(self.task, "unit", "rows")
            self.log(f"{cfg.steps} steps of {per} {unit}: {cfg.steps * per / rows:.2f} epochs of the training {unit}")
        if rows < per:
            msg = (f"data: {rows} packed row{'s' if rows != 1 else ''} but a step takes {per} (--batch-tokens "
                   f"{cfg.batch_tokens} / --seq-len {cfg.seq_len}): every step repeats rows (each reads the data "
                   f"{per / rows:.1f} times); lower --batch-tokens for distinct rows in a step")
            self.warnings.append(msg)
            self.log("warning: " + msg)

    def _lora(self, model) -> None:
        cfg = self.cfg
        if cfg.lora_rank:
            targets = cfg.lora_targets or default_lora_targets(model, cfg.train_vision, cfg.train_audio)
            apply_lora(model, LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                         targets=targets))

    def _build_model(self, model):
        """LoRA, then (under a layout) the pipeline split and ``parallelize``; in one process activation
        checkpointing and compile: applied from outside the model, in one fixed order."""
        self.model_source = None  # where the base model came from: an adapter names it (PEFT loads base + adapter)
        if model is None and is_rank0():
            source = resolve(self.cfg.model)
            self.model_source = str(source.resolve())
            model, _ = load_any(source, dtype=torch.float32,
                                device="cpu" if self.dims is not None else self.device, with_tokenizer=False,
                                text_only=self.cfg.text_only)
        if is_rank0():
            if self._wants_reference() and self.dims is None:
                self.ref_model = _frozen_copy(model)  # before LoRA, checkpointing, compile: the plain base
            freeze_towers(model, train_vision=self.cfg.train_vision, train_audio=self.cfg.train_audio)
            self._lora(model)
            self.base_id = _frozen_id(model)
        self.base_id = _from_rank0(self.base_id)
        if self.dims is None:
            self._check_context(int(model.config.max_position_embeddings))
            if self.pcfg.activation_checkpointing:
                every = 1 if self.pcfg.activation_checkpointing is True else int(self.pcfg.activation_checkpointing)
                apply_activation_checkpointing(model, every=every)
            if self.pcfg.compile:
                compile_blocks(model, backend=self.pcfg.compile_backend)
            model.train()
            model.attn_backend = self.cfg.attn_backend
            return model
        # rank 0 holds the full model (LoRA adapters initialised there); every rank builds its part on
        # the meta device, then rank 0's weights are broadcast shard by shard
        config = _from_rank0(model.config if is_rank0() else None)
        self._check_context(int(config.max_position_embeddings))
        self.dims = self.dims.validate(self.world, config, self.cfg.seq_len)
        mesh = self.dims.build_mesh(self.device.type)
        full = {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_rank0() else {}
        del model
        meta = build_meta_model(config)
        freeze_towers(meta, train_vision=self.cfg.train_vision, train_audio=self.cfg.train_audio)
        self._lora(meta)
        if self.dims.pp > 1:  # cut the meta model down to this rank's stage first
            n_mb = self.cfg.accum * self.cfg.rows_per_micro_batch // self.dims.dp_shard
            self.pipe = Pipeline(meta, mesh, self.pcfg.pp_schedule, n_microbatches=n_mb)
            meta = self.pipe.module
        parallelize(meta, mesh, self.pcfg)
        materialize(meta, self.device, state_dict=full, broadcast=True)
        if self._wants_reference():  # the frozen reference, sharded like the policy (no checkpointing: no grad)
            ref = build_meta_model(config)
            parallelize(ref, mesh, ParallelConfig())
            materialize(ref, self.device, state_dict=full, broadcast=True)
            self.ref_model = _frozen_copy(ref, copy=False)
            self.ref_model.attn_backend = self.cfg.attn_backend
        del full
        meta.train()
        meta.attn_backend = self.cfg.attn_backend
        applied = ", ".join(meta.transforms.parallel.applied) or "nothing to apply"
        self.log(f"parallel: {self.dims.describe()} on {self.world} processes ({applied})")
        if self.pipe is not None:
            self.log(f"parallel: {self.pipe.describe()} (rank 0's stage)")
        return meta

    def _wants_reference(self) -> bool:
        """A frozen copy is the reference only without LoRA (with it: the adapters disabled)."""
        return self.task.needs_reference(self.dims) and not self.cfg.lora_rank

    @property
    def stream(self):
        """The row order of a packed-row source (its data position)."""
        return self.source.stream

    @stream.setter
    def stream(self, value) -> None:
        self.source.stream = value

    def fingerprint(self) -> dict:
        """What a checkpoint continues only with: the model, the training shape, the data (its packed
        rows' digest), the optimizer and schedule settings, LoRA's, and (when parameters are frozen, so
        not in the checkpoint) the base weights' identity."""
        c = self.cfg
        fp = {"model_config": json.loads(json.dumps(self.model.config.to_hf(), default=str)),
              "seq_len": c.seq_len, "batch_tokens": c.batch_tokens, "micro_batch_rows": c.micro_batch_rows,
              "lora_rank": c.lora_rank, "seed": c.seed}
        for k in _FIXED:
            fp[k] = getattr(c, k)
        fp.update(self.task.fingerprint())
        # last: what derives from the settings above (compared in this order, the cause is named first)
        fp["data"] = self.data_id
        if self.base_id is not None:
            fp["base_model"] = self.base_id
        return fp

    # ---- the step ----
    def _micro_batches(self) -> list[dict]:
        """This rank's micro-batches of the next step, from the task's batch source."""
        return self.source.batches(self.step)

    def _reduce_metrics(self, sums: dict) -> dict:
        """``{name: (sum, weight)}`` of this rank -> ``{name: global sum / global weight}`` (collective)."""
        if not sums:
            return {}
        names = sorted(sums)
        t = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in names], dtype=torch.float64)
        if is_distributed() and self.layout.dp_group is not None:
            dist.all_reduce(t, group=self.layout.dp_group)
        return {k: float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else float("nan") for i, k in enumerate(names)}

    def _pop_metrics(self) -> dict:
        sums = dict(self.source.pop_metrics())
        pop = getattr(self.objective, "pop_metrics", None)
        sums.update(pop() if pop is not None else {})
        return self._reduce_metrics(sums)

    def train_step(self) -> dict:
        pos_before = self.source.state_dict()
        t0 = time.perf_counter()
        batches = self._micro_batches()
        t_data = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = forward_backward(self.model, batches, self.objective, self.layout, autocast=self.autocast)
        # one pass over the gradients: their norm (for clipping) and whether all are finite (every rank)
        gn, finite = grad_norm_and_finite(self.params, self.layout.owner_factor()) if math.isfinite(res.loss) \
            else (None, False)
        ok = finite and math.isfinite(res.loss)
        row = {"step": self.step + 1, "loss": res.loss, "lr": self.scheduler.get_last_lr()[0], "tokens": res.tokens,
               "valid_tokens": res.count, **self._pop_metrics()}
        if t_data > 0.05:  # a source that computes (reference log-probs, rollouts): its time, apart from the step's
            row["data_s"] = t_data
        if ok:
            if self.cfg.clip > 0 and gn is not None:
                clip_grads_(self.params, self.cfg.clip, gn)
                row["grad_norm"] = float(gn)
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            where, j = self._diagnose(batches, res)
            msg = f"step {self.step + 1}: skipped, {where} (micro-batch {j}, {self.source.where(pos_before, j)})"
            self.log(msg)
            row.update(skipped=True, reason=msg)
            self.bad_in_a_row += 1
        return self._finish_step(row, ok, t0, res.tokens)

    def _diagnose(self, batches: list[dict], res) -> tuple[str, int]:
        """Where the step's first non-finite value was born: its micro-batches re-run under hooks
        (every rank together under a layout)."""
        if self.pipe is not None:
            return "non-finite loss or gradient (pipeline stages: not localised)", res.bad or 0
        dev = next(self.model.parameters()).device
        runs = [lambda b={k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}:
                micro_batch_loss(self.model, b, self.objective, self.layout, self.autocast) / max(res.count, 1)
                for b in batches]
        report, j, rank = locate_in_step(self.model, runs, res.bad)
        if report is None:
            return "non-finite gradient (not reproduced on re-run)", j
        return report.message + (f" on rank {rank}" if self.dims is not None else ""), j

    def _finish_step(self, row: dict, ok: bool, t0: float, n_tokens: int) -> dict:
        """After the optimizer step (or the skip): advance the schedule, time the step, stop after
        ``max_bad_steps`` consecutive non-finite steps."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        row["step_s"] = dt
        row["tokens_per_s"] = n_tokens / dt
        if not ok and self.bad_in_a_row >= self.cfg.max_bad_steps:
            self._write_metrics(row)
            raise TrainingStopped(f"{self.bad_in_a_row} consecutive non-finite steps; last: {row['reason']}")
        return row

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """The objective on the source's validation batches: ``val_loss`` (``val_ppl`` where the objective's
        loss is a cross-entropy), ``val_tokens`` (its count) and ``val_<metric>`` of the objective's
        metrics. The same path as ``evaluate.evaluate_rows`` (``gemmaforge eval``): one
        ``forward_backward(..., backward=False)`` over every batch, the model in eval mode."""
        from .evaluate import perplexity

        batches = self.source.val_batches()
        if not batches:
            return None
        was = self.model.training
        self.model.eval()
        try:
            res = forward_backward(self.model, batches, self.objective, self.layout, backward=False,
                                   autocast=self.autocast)
        finally:
            self.model.train(was)
        extra = {f"val_{k}": v for k, v in self._pop_metrics().items()}
        if res.count == 0:
            return None
        out = {"val_loss": res.loss}
        if getattr(self.objective, "perplexity", True):
            out["val_ppl"] = perplexity(res.loss)
        return {**out, "val_tokens": res.count, **extra}

    # ---- persistence ----
    def _write_metrics(self, row: dict) -> None:
        if is_rank0():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.sinks is not None:
                self.sinks.write(row)

    def save_checkpoint(self) -> Path:
        """The run's state at this step (trainable parameters, their AdamW state, schedule, data position,
        RNG): a LoRA run's frozen base is not written. Keeps the newest ``keep_last`` (at least 1)."""
        extra = {**self.fingerprint(), "layout": self.dims.describe() if self.dims is not None else "one process",
                 "schedule_state": {"steps": self.cfg.steps, "anchor": list(self._anchor) if self._anchor else None}}
        return save_train_state(self.out, self.step, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler,
                                data_state={**self.source.state_dict(), "bad_in_a_row": self.bad_in_a_row},
                                extra=extra, keep_last=max(1, self.cfg.keep_last), trainable_only=True)

    def _resume(self, path: str) -> None:
        p = Path(path)
        found = None
        if is_rank0():
            if not p.exists():
                found = ("error", f"--resume {p}: path does not exist")
            else:
                ck = p if (p / "meta.json").exists() else latest_checkpoint(p)
                if ck is not None:
                    try:
                        found = ("ok", (str(ck), checkpoint_step(ck)))
                    except CheckpointError as e:
                        found = ("error", str(e))
                elif (run_dir_of(p) / "final").is_dir() or (run_dir_of(p) / "adapter").is_dir():
                    found = ("error", f"--resume {p}: no checkpoint: the run finished and kept none (--keep-last 0; "
                                      f"--keep-last 1 keeps its last step to continue it); its export can start a "
                                      f"new run (--model {run_dir_of(p) / 'final'})")
                else:
                    found = ("error", f"--resume {p}: no complete checkpoint found")
        status, value = _from_rank0(found)
        if status == "error":
            raise CheckpointError(value)
        ckpt, saved_at = Path(value[0]), int(value[1])
        if saved_at > self.cfg.steps:
            raise ConfigError(f"--steps {self.cfg.steps}: the checkpoint {ckpt} is at step {saved_at} "
                              f"already; give more --steps to continue the run")
        try:
            step, data_state, extra = load_train_state(ckpt, model=self.model, optimizer=self.optimizer,
                                                       scheduler=self.scheduler, expect_extra=self.fingerprint(),
                                                       trainable_only=True)
        except CheckpointError as e:
            if "incompatible checkpoint" not in str(e):
                raise
            raise CheckpointError(f"{e}; a run continues only with its own model, data and optimizer settings "
                                  f"(--resume RUN_DIR restores them: leave out the flags that differ)") from None
        self._refit_schedule(step, extra.get("schedule_state") or {})
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the rate in force at the save point
        self.step = step
        self.source.load_state_dict(data_state)
        self.bad_in_a_row = int(data_state.get("bad_in_a_row", 0))
        # metrics after the checkpoint belong to the interrupted future: drop them so the curve is exact
        if is_rank0() and self.metrics_path.exists():
            keep = [l for l in self.metrics_path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= step]
            self.metrics_path.write_text("".join(l + "\n" for l in keep))
        self.log(f"resumed from {ckpt} at step {step} (saved at {extra.get('layout', 'one process')})")

    def _refit_schedule(self, step: int, saved: dict) -> None:
        """A resumed run whose ``--steps`` differs from the saved run's keeps a monotonic schedule: past
        the warm-up, the rate goes on from its value at the save point down to the final rate at the new
        last step (never back up); during the warm-up the schedule is simply the one of the new length."""
        cfg = self.cfg
        old_steps = int(saved.get("steps", cfg.steps))
        old_anchor = tuple(saved["anchor"]) if saved.get("anchor") else None
        anchor = old_anchor
        if old_steps != cfg.steps and cfg.schedule != "constant":
            f0 = lr_lambda(dataclasses.replace(cfg, steps=old_steps), old_anchor)(step)
            if step >= cfg.warmup_steps:
                anchor = (step, f0)
                lr0, lr1 = cfg.lr * f0, cfg.lr * cfg.min_lr_ratio
                if f0 <= cfg.min_lr_ratio + 1e-12:
                    self.log(f"--steps {cfg.steps} (the run had {old_steps}): its {cfg.schedule} schedule had ended at "
                             f"step {step}, so the learning rate stays at its final {lr1:.3g} (a resumed schedule "
                             f"never rises again; for a fresh one start a new run from this one's weights)")
                else:
                    self.log(f"--steps {cfg.steps} (the run had {old_steps}): the learning rate goes on from "
                             f"{lr0:.3g} at step {step} down to {lr1:.3g} at step {cfg.steps} (a resumed schedule "
                             f"never rises again)")
            else:
                self.log(f"--steps {cfg.steps} (the run had {old_steps}): resumed in the warm-up, the schedule "
                         f"decays over {cfg.steps} steps")
        self._anchor = anchor
        self.scheduler.lr_lambdas = [lr_lambda(cfg, anchor) for _ in self.optimizer.param_groups]

    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        self.log(f"received signal {signum}: saving a checkpoint after this step")

    def _stop_requested(self) -> int | None:
        """The signal any rank received (every rank stops after the same step)."""
        if not is_distributed():
            return self._stop_signal
        t = torch.tensor([self._stop_signal or 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t) or None

    # ---- main ----
    def run(self) -> dict:
        """Train to ``cfg.steps``, evaluate, export; returns the summary (``exit_code`` 128 + signal when
        a SIGINT/SIGTERM stopped it). A run that fails before its first step leaves no run directory."""
        cfg = self.cfg
        start = self.step
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if is_rank0():
                write_recipe(dataclasses.replace(cfg, **absolute_paths(
                    {k: getattr(cfg, k) for k in ("data", "val_data", "model")})), self.out)
                if self.task.fingerprint():  # a task's own settings (--resume restores them with the recipe)
                    (self.out / "task.json").write_text(json.dumps(self.task.fingerprint(), indent=2) + "\n")
            self._open_sinks(first_step=start + 1 if start else 0)
            return self._run()
        except BaseException:
            if self.step == start == 0 and not (self.out / "metrics.jsonl").exists():
                self._discard_out()
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.sinks is not None:
                self.sinks.close()
                self.sinks = None

    def _open_sinks(self, first_step: int) -> None:
        """TensorBoard / wandb on rank 0; a failure is the same one line on every rank."""
        err = None
        if is_rank0() and self.cfg.log:
            try:
                config = {k: v for k, v in dataclasses.asdict(self.cfg).items() if v is not None}
                self.sinks = MetricSinks(self.cfg.log, self.out, config, first_step=first_step, log=self.log)
            except ConfigError as e:
                err = str(e)
        err = _from_rank0(err)
        if err:
            raise ConfigError(err)

    def _checkpoint_plan(self) -> str:
        cfg = self.cfg
        if not cfg.save_every:
            return "checkpoints: none (--save-every 0): this run cannot be resumed"
        if cfg.keep_last:
            return (f"checkpoints: every {cfg.save_every} steps and the last, the newest {cfg.keep_last} kept "
                    f"({self.out / 'checkpoints'})")
        return (f"checkpoints: every {cfg.save_every} steps, the newest kept while the run goes (to resume it if "
                f"interrupted) and removed when it completes (--keep-last N keeps N, the last step's included)")

    def _run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        summary: dict = {"out": str(self.out), "steps": cfg.steps,
                         "compute_dtype": "bfloat16" if self.autocast is not None else "float32"}
        self.log(self.dtype_note)
        self._write_metrics({"step": self.step, "compute_dtype": summary["compute_dtype"], "dtype_note": self.dtype_note})
        if self.warnings:
            summary["warnings"] = list(self.warnings)
        self.log(self._checkpoint_plan())
        if self.step == 0:
            ev = self.evaluate()
            if ev:
                self.log(f"validation before: {_val_text(ev)}")
                self._write_metrics({"step": 0, **ev})
                summary["val_before"] = ev
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", file=sys.stderr,
                   disable=not self.show_bar, dynamic_ncols=True)
        every, first, t0 = cfg.resolved_log_every, self.step, time.perf_counter()
        while self.step < cfg.steps:
            row = self.train_step()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                ev = self.evaluate()
                if ev:
                    row.update(ev)
            self._write_metrics(row)
            if self.show_bar:
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if "val_loss" in row:
                    bar.write(f"step {self.step}: validation {_val_text(row)}", file=sys.stderr)
            elif self.step % every == 0 or self.step in (first + 1, cfg.steps) or "val_loss" in row \
                    or row.get("skipped"):
                self.log(plain_line(row, cfg.steps, time.perf_counter() - t0, self.step - first))
            stop = self._stop_requested()
            if stop is not None:
                bar.close()
                summary["interrupted"] = True
                summary["exit_code"] = 128 + stop
                if not cfg.save_every:
                    self.log(f"stopped by signal at step {self.step}; no checkpoint (--save-every 0): this run "
                             f"cannot be resumed")
                    return summary
                ck = self.save_checkpoint()
                summary["checkpoint"] = str(ck)
                self.log(f"stopped by signal at step {self.step}; checkpoint {ck}; resume with: gemmaforge {self.task.command} "
                         f"--resume {self.out}  (its settings are restored; flags given again override)")
                return summary
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        ev = self.evaluate()
        if ev:
            self.log(f"validation after:  {_val_text(ev)}")
            self._write_metrics({"step": self.step, **ev})
            summary["val_after"] = ev
        if cfg.save_every and cfg.keep_last:
            summary["checkpoint"] = str(self.save_checkpoint())
        summary["final"] = str(self.export())
        if cfg.save_every and not cfg.keep_last and remove_checkpoints(self.out):
            self.log(f"checkpoints removed: the run is complete ({summary['final']}); --keep-last 1 keeps the "
                     f"last step's to continue the run with more --steps")
        if is_rank0():
            self.plot()
        return summary

    def export(self) -> Path:
        """The final model as an HF-format dir (LoRA: an adapter dir too; ``no_merge``: the adapter dir
        only) that generate and transformers load, in ``save_dtype``. Collective under a layout (the
        shards are gathered to rank 0, which writes). Returns the dir written last (final/ or adapter/)."""
        if self.cpu is not None:
            self.cpu.remove()  # plain modules again: nothing of the CPU policy is copied or saved
            self.cpu = None
        cfg = self.cfg
        dst = self.out / "final"
        dtype = getattr(torch, SAVE_DTYPES[cfg.save_dtype])
        if self.dims is None:
            model = self.model
        else:
            sd = full_state_dict(self.model)
            model = None
            if is_rank0():
                model = build_model(self.model.config, device="meta")
                self._lora(model)
                load_into(model, sd, "sharded model", dtype=next(iter(sd.values())).dtype)
        if is_rank0():
            if cfg.lora_rank:
                adapter = save_adapter(model, self.out / "adapter", base_model_name=self.model_source, dtype=dtype)
                self.log(f"adapter: {adapter}")
                if cfg.no_merge:
                    dst = adapter
                else:
                    model = merged_copy(model)
            if not (cfg.lora_rank and cfg.no_merge):
                save_hf(model, dst, tokenizer=self.tokenizer, dtype=dtype, max_shard_size=shard_bytes(cfg.max_shard_size))
                self.log(f"final model: {dst}")
        elif cfg.lora_rank and cfg.no_merge:
            dst = self.out / "adapter"
        if is_distributed():
            dist.barrier()
        return dst

    def plot(self) -> Path:
        self.task.plot(self)
        return plot_metrics(self.metrics_path, self.out / "loss.png")


# settings a checkpoint continues only with (besides the model and training shape): the optimizer's and the
# schedule's (AdamW keeps its hyper-parameters in its state) and LoRA's
_FIXED = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "decay_norms_and_embeddings", "beta1",
          "beta2", "eps", "lora_alpha", "lora_dropout", "lora_targets")


def _val_text(ev: dict) -> str:
    """``loss 2.1234, perplexity 8.37`` (and the objective's validation metrics, e.g. DPO's rewards)."""
    parts = [f"loss {ev['val_loss']:.4f}"]
    if "val_ppl" in ev:
        parts.append(f"perplexity {ev['val_ppl']:.2f}")
    parts += [f"{k[4:]} {v:.4g}" for k, v in ev.items() if k.startswith("val_") and k not in
              ("val_loss", "val_ppl", "val_tokens")]
    return ", ".join(parts)


def _frozen_copy(model, copy: bool = True):
    """A reference policy: ``model`` (or a deep copy of it) in eval mode with every parameter frozen."""
    import copy as _copy

    ref = _copy.deepcopy(model) if copy else model
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _frozen_id(model) -> str | None:
    """The frozen parameters' identity (a LoRA run's base weights, left out of its checkpoints): a digest
    of their names, shapes and 64 values spread over each; None when every parameter trains."""
    h = hashlib.sha256()
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long().clamp(max=flat.numel() - 1)
            idx = idx.to(flat.device)  # (clamped: fp32 linspace rounds the last index of a 167M table up)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
            n += 1
    return f"{n} frozen tensors, sha256 {h.hexdigest()[:16]}" if n else None
