"""The training loop: continued pretraining and fine-tuning that never lies about its loss.

The path of a token: documents -> packed rows with ``cu_seqlens`` -> ``model(..., return_hidden=True)``
-> chunked linear cross-entropy (never the full ``[T, vocab]`` logits) summed over valid tokens and
divided by the step's global count of valid tokens -> backward -> health check (a non-finite loss
or gradient skips the step and names the first module that produced it; nothing is clamped) ->
clip -> AdamW -> scheduler -> metrics, evaluation, atomic checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import ConfigError, DataError, GemmaforgeError

IGNORE = -100


class TrainingStopped(GemmaforgeError):
    """Too many consecutive non-finite steps: the run stops with the diagnosis."""


@dataclass
class TrainConfig:
    model: str | None = None  # HF dir, .gguf, or preset name; None = embedded gemma-3-270m
    data: list[str] = field(default_factory=list)  # .txt / dir / .jsonl; empty = CPython's language reference
    out: str | None = None  # default runs/<timestamp>
    steps: int = 16
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    decay_norms_and_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    seq_len: int = 256
    batch_tokens: int = 512  # tokens per optimizer step (rows * seq_len); grad accumulation over rows
    micro_batch_rows: int = 2  # rows per forward: the default 512-token step in one forward (a second micro-batch
    # would hold a second [V, H] head gradient: 270M, 5.31 vs 4.66 GiB peak and slower)
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 8
    eval_rows: int = 4
    save_every: int = 8
    keep_last: int = 2
    max_bad_steps: int = 3
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str | None = None
    attn_backend: str | None = None
    loss_chunk_size: int = 128  # tokens per LM-head chunk beyond the first min(T, hidden) (those use the
    # weight-gradient buffer): a [chunk, vocab] fp32 buffer, 128 MiB at 262k vocab, kept from step to step
    # (HeadGradBuffer.logits); a frozen head (LoRA) always uses it. 256 was as fast and peaked 0.12 GiB higher.
    resume: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    progress: bool = True

    @property
    def rows_per_micro_batch(self) -> int:
        """``micro_batch_rows``, but never more rows than one step holds (``batch_tokens // seq_len``)."""
        return max(1, min(self.micro_batch_rows, self.batch_tokens // self.seq_len))

    @property
    def accum(self) -> int:
        per_micro = self.seq_len * self.rows_per_micro_batch
        return max(1, self.batch_tokens // per_micro)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_tokens", "micro_batch_rows", "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--schedule must be cosine, linear or constant (got {self.schedule!r})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def load_recipe(path: str | Path) -> dict:
    """A ``recipe.toml`` whose keys mirror the flags (dashes or underscores)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    out = {}
    known = TrainConfig.field_names()
    for k, v in d.items():
        key = k.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{p}: unknown key {k!r}")
        out[key] = v
    return out


# ----------------------------------------------------------------------------------- data

def builtin_corpus() -> list[str]:
    """The Python language reference that ships inside CPython (pydoc_data.topics), one doc per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


class RowStream:
    """Deterministic order over packed rows: a seeded permutation per epoch, position = (epoch, cursor)."""

    def __init__(self, rows: list, seed: int, epoch: int = 0, cursor: int = 0):
        self.rows, self.seed, self.epoch, self.cursor = rows, seed, epoch, cursor
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self):
        if self.cursor >= len(self.rows):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        row = self.rows[self._perm[self.cursor]]
        self.cursor += 1
        return row

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


# ----------------------------------------------------------------------------------- optimizer

def param_groups(model, weight_decay: float, decay_all: bool) -> list[dict]:
    """No weight decay on norms, biases and embeddings unless asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or "embed" in name or "norm" in name
        (no_decay if skip and not decay_all else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


# ----------------------------------------------------------------------------------- memory

class ReturnFreedMemory:
    """Hand freed heap memory back to the OS at a few points of a CPU training step (glibc only).

    glibc recycles freed activations from a heap that never shrinks on its own: the resident size
    of a 270M fine-tune sat ~0.6 GiB above what was live (holes left by temporaries, gradients
    landing above freed activations). ``malloc_trim(0)`` releases every free page of the heap.
    The Trainer calls it after the forward (before the LM-head loss, the step's memory peak).
    Through ``attach``, the backward checks the resident size as it reaches each decoder block
    and trims only when it has grown more than ``slack`` bytes above its size at the first block
    (just after the loss): a trim's pages come back as page faults when the heap reuses them, so
    trimming at every block cost ~0.3 M faults and ~1 s of system CPU per 270M step, while the
    peak needs only a few trims. A later forward trims after a block that takes the size above
    that mark (the forward's freed temporaries must not set the peak while ``HeadGradBuffer`` keeps
    the head's gradient memory). Cheaper than a small fixed mmap threshold, which maps, faults and
    unmaps every buffer above it on every allocation. ``SLACK`` is 128 MiB: on the 270M at 512
    tokens, 64 MiB cost ~60 k more page faults per step and 256 MiB raised the peak to 4.62 GiB
    (128 MiB: 4.50 GiB). ``create()`` returns None where there is no glibc.
    """

    SLACK = 128 << 20

    def __init__(self, trim, slack: int = SLACK, rss=None):
        self._trim = trim
        self.slack = int(slack)
        self._rss = rss if rss is not None else _resident_bytes
        self._mark: Optional[int] = None
        self._ceiling: Optional[int] = None

    @classmethod
    def create(cls, slack: Optional[int] = None) -> "ReturnFreedMemory | None":
        if not sys.platform.startswith("linux"):
            return None
        import ctypes

        try:
            fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            return None
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        return cls(fn, cls.SLACK if slack is None else slack)

    @classmethod
    def for_model(cls, model, slack: Optional[int] = None) -> "ReturnFreedMemory | None":
        """``create()`` where the model trains at least a quarter of its weights; None for adapters
        (LoRA). The gradients, allocated during the backward above the freed activations, are what
        grows the heap: LoRA r16 on the 270M peaked at 2.18 GiB untrimmed vs 2.10 GiB trimmed, while
        the trims cost it ~170 k page faults per step (full fine-tune: 4.82 vs 4.50 GiB)."""
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        trained = sum(p.numel() for p in params if p.requires_grad)
        return cls.create(slack) if total and 4 * trained >= total else None

    def __call__(self) -> None:
        self._trim(0)

    def during_backward(self) -> None:
        """At a block's backward: the first sets the mark, later ones trim above mark + slack."""
        rss = self._rss()
        if self._mark is None:
            self._mark = self._ceiling = rss
        elif rss > self._mark + self.slack:
            self._trim(0)

    def during_forward(self) -> None:
        """After a block's forward: trim when the size is above the last backward's mark (the size
        just after the loss, which the step reaches anyway), so the forward's freed temporaries
        never set the peak."""
        if self._ceiling is not None and self._rss() > self._ceiling:
            self._trim(0)

    def attach(self, model) -> int:
        """Check (and maybe trim) when the gradient reaches each decoder block's output; returns the
        hooked blocks. Each forward through the first block starts a new mark."""
        from .transforms.checkpointing import decoder_layers

        try:
            layers = decoder_layers(model)
        except TypeError:
            return 0

        def on_grad(_grad):
            self.during_backward()

        def after_forward(first, _module, _args, out):
            if torch.compiler.is_compiling():  # a compiled block (``--compile``): no tensor hooks in the graph
                return
            outs = out if isinstance(out, (tuple, list)) else (out,)
            t = next((o for o in outs if isinstance(o, torch.Tensor)), None)
            if t is not None and t.requires_grad and torch.is_grad_enabled():
                if first:
                    self._mark = None
                t.register_hook(on_grad)
                self.during_forward()

        for i, (_, layer) in enumerate(layers):
            layer.register_forward_hook(functools.partial(after_forward, i == 0))
        return len(layers)


def _resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; ~10 us)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class TiedEmbeddingGrad:
    """The embedding half of a tied embedding/LM head's gradient, accumulated in place.

    With the table tied to the head, autograd receives two gradients for one weight: the dense
    ``[V, H]`` one of the head and the embedding lookup's. It sums them out of place, so a second
    ``[V, H]`` buffer (671 MB for Gemma 3 270M) exists at the end of every backward. Here the model
    runs on ``inputs_embeds`` (the scaled lookup, computed without grad, as a leaf); after backward,
    the rows' gradient ``dL/dx * scale`` is ``index_add_``-ed into the head's gradient, skipping the
    padding row as ``nn.Embedding`` does. Same math; used for Gemma 3 (no per-layer embeddings)
    when the table is trained.
    """

    def __init__(self, model):
        self.model, self.embedding = model, model.model.embed_tokens
        self.weight, self.pad = self.embedding.weight, self.embedding.padding_idx

    @staticmethod
    def applies(model) -> bool:
        from torch.distributed.tensor import DTensor

        from .layers.embedding import ScaledEmbedding
        from .models.gemma3 import Gemma3ForCausalLM

        emb = getattr(getattr(model, "model", None), "embed_tokens", None)
        if getattr(model, "lm_head", None) is None:  # e.g. a pipeline stage without the head
            return False
        return (isinstance(model, Gemma3ForCausalLM) and isinstance(emb, ScaledEmbedding)
                and model.head_weight() is emb.weight and emb.weight.requires_grad
                and not isinstance(emb.weight.data, DTensor))

    def leaf(self, ids: torch.Tensor) -> torch.Tensor:
        self.model.check_ids(ids)
        with torch.no_grad():
            x = self.model.embed(ids.reshape(1, -1))
        return x.requires_grad_()

    @torch.no_grad()
    def accumulate(self, ids: torch.Tensor, leaf: torch.Tensor) -> None:
        if leaf.grad is None:
            return
        rows = ids.reshape(-1)
        g = leaf.grad.reshape(-1, leaf.shape[-1]).to(self.weight.dtype) * self.embedding.factor()
        if self.pad is not None:
            g[rows == self.pad] = 0
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        self.weight.grad.index_add_(0, rows, g)
        leaf.grad = None


class HeadGradBuffer:
    """One ``[V, H]`` buffer that the LM-head loss writes its logits and weight gradient into, step
    after step (CPU); for a frozen head (LoRA) one ``[chunk, V]`` logits workspace instead.

    A fresh 671 MB gradient for Gemma 3 270M's head each step costs ~164 k first-touch page faults
    (the allocator maps it anew and unmaps it at ``zero_grad``). With this buffer the head's
    gradient (``weight.grad``) is a tensor over the same memory; ``zero_grad(set_to_none=True)``
    drops that tensor, the memory stays for the next step. ``get`` hands the buffer out only while
    ``weight.grad`` is None (the first micro-batch of a step; later ones accumulate into it), for an
    fp32, trainable, non-distributed weight; else None (a fresh gradient, as without it). It adds
    nothing to the step's peak: the gradient exists from the loss to the optimizer step anyway, and
    ``ReturnFreedMemory`` keeps the forward below the loss's size.
    """

    def __init__(self):
        self.buf: Optional[torch.Tensor] = None
        self.ws: Optional[torch.Tensor] = None

    def get(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        if weight.grad is not None or not weight.requires_grad or weight.dtype != torch.float32 or not _local(weight):
            return None
        self.buf = _kept(self.buf, tuple(weight.shape), weight.device)
        return self.buf

    def logits(self, weight: torch.Tensor, chunk: int) -> Optional[torch.Tensor]:
        """The ``chunk * V`` fp32 logits workspace of a frozen head's loss while training (LoRA: a
        fresh 268 MB workspace per step was ~65 k page faults on Gemma 3 270M); None for a trained
        head (its logits live in ``get``'s buffer) or without gradients."""
        if weight.requires_grad or not _local(weight):
            return None
        self.ws = _kept(self.ws, (chunk * weight.shape[0],), weight.device)
        return self.ws

    def loss_buffers(self, weight: torch.Tensor, chunk: int) -> dict:
        """``chunked_cross_entropy``'s ``weight_grad_buffer`` and ``logits_buffer`` for this micro-batch."""
        return {"weight_grad_buffer": self.get(weight), "logits_buffer": self.logits(weight, chunk)}


def _local(weight: torch.Tensor) -> bool:
    """Training (gradients on) a plain, not distributed, weight."""
    from torch.distributed.tensor import DTensor

    return torch.is_grad_enabled() and not isinstance(weight, DTensor)


def _kept(buf: Optional[torch.Tensor], shape: tuple, device: torch.device) -> torch.Tensor:
    """``buf`` when it already has this shape and device, else a new fp32 one."""
    if buf is None or tuple(buf.shape) != shape or buf.device != device:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
    return buf


# ----------------------------------------------------------------------------------- trainer

class Trainer:
    """Build with a TrainConfig (and optionally a ready model/tokenizer/documents), then ``run()``."""

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, train_docs=None, val_docs=None,
                 log=None):
        cfg.validate()
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = self.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16", "bf16")
        if self.autocast:
            # the fp32 parts of a bf16 run (the chunked LM-head loss) use TF32 tensor cores, not IEEE fp32
            torch.backends.cuda.matmul.allow_tf32 = True
        self.out = self._prepare_out()
        self._set_seed(cfg.seed)
        # tokenizer and data first: bad data fails in a second, before the model loads
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer()
        self.train_rows, self.val_rows = self._load_data(train_docs, val_docs)
        self.model = self._load_model(model)
        self._apply_transforms()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.tied_grad = TiedEmbeddingGrad(self.model) if TiedEmbeddingGrad.applies(self.model) else None
        self.head_grad = HeadGradBuffer() if self.device.type == "cpu" and not self.autocast else None
        self.trim = ReturnFreedMemory.for_model(self.model) if self.device.type == "cpu" else None
        if self.trim is not None:
            self.trim.attach(self.model)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, cfg.decay_norms_and_embeddings),
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.stream = RowStream(self.train_rows, cfg.seed)
        self.step = 0
        self.bad_in_a_row = 0
        self.metrics_path = self.out / "metrics.jsonl"
        self._stop_signal: int | None = None
        if cfg.resume:
            self._resume(cfg.resume)

    # ---- setup ----
    def _prepare_out(self) -> Path:
        cfg = self.cfg
        if cfg.out is None and cfg.resume:
            r = Path(cfg.resume)
            cfg.out = str(r.parent.parent if r.parent.name == "checkpoints" else r)
        out = Path(cfg.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {out}: not writable ({e.strerror or e})") from None
        return out

    def _set_seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _load_tokenizer(self):
        from .api import load_tokenizer

        return load_tokenizer(self.cfg.model)

    def _load_model(self, model):
        from .api import from_pretrained

        if model is None:
            model = from_pretrained(self.cfg.model, dtype=torch.float32, device=self.device)
        model.train()
        model.attn_backend = self.cfg.attn_backend
        return model

    def _load_data(self, train_docs, val_docs):
        from .data import Document, load_documents, pack_documents, packing_stats, train_val_split

        cfg = self.cfg
        if train_docs is None:
            if cfg.data:
                docs = load_documents(cfg.data, self.tokenizer)
            else:
                tok = self.tokenizer
                docs = [Document(tok.encode(t) + [tok.eos_id]) for t in builtin_corpus()]
            if not docs:
                raise DataError(f"{', '.join(cfg.data) or 'data'}: no documents")
            train_docs, val_docs = train_val_split(docs, cfg.val_fraction, seed=cfg.seed)
        train_rows = pack_documents(train_docs, cfg.seq_len)
        val_rows = pack_documents(val_docs or [], cfg.seq_len)[: cfg.eval_rows] if val_docs else []
        st = packing_stats(train_rows)
        self.log(f"data: {len(train_docs)} train docs -> {st}; {len(val_rows)} validation rows")
        return train_rows, val_rows

    def _apply_transforms(self) -> None:
        """LoRA, then activation checkpointing: applied from outside the model, in one fixed order."""
        cfg = self.cfg
        if cfg.lora_rank:
            from .transforms.lora import LoraConfig, apply_lora

            apply_lora(self.model, LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                              targets=cfg.lora_targets or None))
        if cfg.activation_checkpointing:
            from .transforms.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model)

    def fingerprint(self) -> dict:
        c = self.cfg
        return {"model_config": json.loads(json.dumps(self.model.config.to_hf(), default=str)),
                "seq_len": c.seq_len, "batch_tokens": c.batch_tokens, "micro_batch_rows": c.micro_batch_rows,
                "lora_rank": c.lora_rank, "seed": c.seed}

    # ---- the step ----
    def _micro_batches(self):
        from .data import collate_rows

        cfg = self.cfg
        return [collate_rows([self.stream.next() for _ in range(cfg.rows_per_micro_batch)]) for _ in range(cfg.accum)]

    def _loss_sum(self, batch, lean_leaf: list | None = None) -> torch.Tensor:
        """Summed token loss of one micro-batch. ``lean_leaf``: a list that receives ``(ids, leaf)``
        when the tied embedding's gradient is to be accumulated by ``TiedEmbeddingGrad``."""
        from .loss import chunked_cross_entropy

        ids = batch["input_ids"].to(self.device)
        cu = batch["cu_seqlens"].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if lean_leaf is not None:
                leaf = self.tied_grad.leaf(ids)
                lean_leaf.append((ids, leaf))
                hidden = self.model(inputs_embeds=leaf, cu_seqlens=cu, return_hidden=True)
            else:
                hidden = self.model(ids, cu_seqlens=cu, return_hidden=True)
        labels = batch["labels"].to(self.device).reshape(-1)
        if self.trim is not None and torch.is_grad_enabled():
            self.trim()  # the forward's temporaries go back before the loss's [V, H] gradient arrives
        weight = self.model.head_weight()
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels,
                                     softcap=getattr(self.model.config, "final_logit_softcapping", None),
                                     chunk_size=self.cfg.loss_chunk_size, reduction="sum",
                                     **(self.head_grad.loss_buffers(weight, self.cfg.loss_chunk_size)
                                        if self.head_grad else {}))

    def train_step(self) -> dict:
        from .health import locate_nonfinite, total_norm_and_finite

        pos_before = self.stream.state()
        batches = self._micro_batches()
        n_valid = sum(int(b["num_valid_labels"]) for b in batches)  # the global count for this step
        n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
        t0 = time.perf_counter()
        total = 0.0
        bad_batch = None
        for i, b in enumerate(batches):
            lean = [] if self.tied_grad is not None else None
            loss = self._loss_sum(b, lean) / max(n_valid, 1)
            if not torch.isfinite(loss):
                bad_batch = bad_batch if bad_batch is not None else i
            loss.backward()
            if lean:
                self.tied_grad.accumulate(*lean[0])
            total += float(loss.detach())
        # one pass over the gradients: their norm (for clipping) and whether all are finite
        gn, finite = total_norm_and_finite(self.params) if bad_batch is None else (None, False)
        ok = bad_batch is None and finite
        row = {"step": self.step + 1, "loss": total, "lr": self.scheduler.get_last_lr()[0], "tokens": n_tokens,
               "valid_tokens": n_valid}
        if ok:
            if self.cfg.clip > 0 and gn is not None:  # = torch.nn.utils.clip_grad_norm_, norm reused
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.clip, gn)
                row["grad_norm"] = float(gn)
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            idx = bad_batch if bad_batch is not None else 0
            report = None
            for j in ([idx] + [k for k in range(len(batches)) if k != idx]):
                report = locate_nonfinite(self.model, lambda b=batches[j]: self._loss_sum(b) / max(n_valid, 1))
                if report is not None and not getattr(report, "ok", False):
                    idx = j
                    break
            where = report.message if report is not None and not getattr(report, "ok", False) else \
                "non-finite gradient (not reproduced on re-run)"
            msg = (f"step {self.step + 1}: skipped, {where} (micro-batch {idx}, data epoch {pos_before['epoch']} "
                   f"row {pos_before['cursor'] + idx * self.cfg.rows_per_micro_batch})")
            self.log(msg)
            row.update(skipped=True, reason=msg)
            self.bad_in_a_row += 1
        return self._finish_step(row, ok, t0, n_tokens)

    def _finish_step(self, row: dict, ok: bool, t0: float, n_tokens: int) -> dict:
        """After the optimizer step (or the skip): advance the schedule, time the step, stop after
        ``max_bad_steps`` consecutive non-finite steps. Shared with the DistributedTrainer."""
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
        if not self.val_rows:
            return None
        from .data import collate_rows

        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        for r in self.val_rows:
            b = collate_rows([r])
            total += float(self._loss_sum(b))
            n += int(b["num_valid_labels"])
        self.model.train(was)
        loss = total / max(n, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": n}

    # ---- persistence ----
    def _write_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_checkpoint(self) -> Path:
        from .checkpoint.train_state import save_train_state

        return save_train_state(self.out, self.step, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler,
                                data_state={**self.stream.state(), "bad_in_a_row": self.bad_in_a_row},
                                extra=self.fingerprint(), keep_last=self.cfg.keep_last)

    def _resume(self, path: str) -> None:
        from .checkpoint.train_state import latest_checkpoint, load_train_state
        from .errors import CheckpointError

        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"--resume {p}: path does not exist")
        ckpt = p if (p / "meta.json").exists() else latest_checkpoint(p)
        if ckpt is None:
            raise CheckpointError(f"--resume {p}: no complete checkpoint found")
        step, data_state, _ = load_train_state(ckpt, model=self.model, optimizer=self.optimizer,
                                               scheduler=self.scheduler, expect_extra=self.fingerprint())
        self.step = step
        self.stream = RowStream(self.train_rows, self.cfg.seed, data_state["epoch"], data_state["cursor"])
        self.bad_in_a_row = int(data_state.get("bad_in_a_row", 0))
        # metrics after the checkpoint belong to the interrupted future: drop them so the curve is exact
        if self.metrics_path.exists():
            keep = [l for l in self.metrics_path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= step]
            self.metrics_path.write_text("".join(l + "\n" for l in keep))
        self.log(f"resumed from {ckpt} at step {step}")

    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        self.log(f"received signal {signum}: saving a checkpoint after this step")

    # ---- main ----
    def run(self) -> dict:
        cfg = self.cfg
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        summary: dict = {"out": str(self.out)}
        if self.step == 0:
            ev = self.evaluate()
            if ev:
                self.log(f"validation before: loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:.2f}")
                self._write_metrics({"step": 0, **ev})
                summary["val_before"] = ev
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", file=sys.stderr,
                   disable=not cfg.progress, dynamic_ncols=True)
        while self.step < cfg.steps:
            row = self.train_step()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                ev = self.evaluate()
                if ev:
                    row.update(ev)
            self._write_metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if self._stop_signal is not None:
                bar.close()
                ck = self.save_checkpoint()
                self.log(f"stopped by signal at step {self.step}; checkpoint {ck}; resume with --resume {self.out}")
                summary["interrupted"] = True
                summary["exit_code"] = 128 + self._stop_signal
                return summary
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        ev = self.evaluate()
        if ev:
            self.log(f"validation after:  loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:.2f}")
            self._write_metrics({"step": self.step, **ev})
            summary["val_after"] = ev
        self.save_checkpoint()
        self.export()
        self.plot()
        return summary

    def export(self) -> Path:
        """The final model as an HF-format dir (LoRA: adapter dir too) that generate and transformers load."""
        from .checkpoint.hf import save_hf

        model = self.model
        if self.cfg.lora_rank:
            from .transforms.lora import merged_copy, save_adapter

            save_adapter(model, self.out / "adapter")
            model = merged_copy(model)
        dst = save_hf(model, self.out / "final", tokenizer=self.tokenizer)
        self.log(f"final model: {dst}")
        return dst

    def plot(self) -> Path:
        return plot_metrics(self.metrics_path, self.out / "loss.png")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_metrics(metrics_path: str | Path, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and not r.get("skipped")]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1.5)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
