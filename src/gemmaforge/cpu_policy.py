"""The CPU policy: what makes training and decoding fast and lean on a CPU, in one place.

Applied by the trainer (``for_training``) and the generator / loader (``for_inference``,
``use_decode_layout``) on CPU only; the model, the loss and the training step read as if it did not
exist. Every piece swaps or re-strides a module from outside (same parameters, same names), or hooks
a decoder layer:

* ``CPUHead`` (the LM head): the logits of 2..512 tokens in 1024-row vocabulary blocks (MKL's one
  ``h @ W.T`` over a 262k-row table was 1.2-1.9x slower for those shapes, identical results);
  while training, the loss forms its logits and the head's ``[V, H]`` gradient in one buffer kept
  from step to step (a frozen head: one kept ``[chunk, V]`` logits workspace), so the 671 MB
  gradient of Gemma 3 270M is not allocated and page-faulted in anew every step
  (``HeadGradBuffer``); and the allocator hands the forward's freed memory back to the OS just
  before the loss (``ReturnFreedMemory``).
* ``LeanTiedEmbedding`` (a tied token embedding that trains): its lookup's gradient is added in place
  into the weight's gradient (the head's) instead of autograd summing a second dense ``[V, H]``
  gradient out of place.
* ``ReturnFreedMemory``: glibc ``malloc_trim`` at a few points of the step (after a block's forward,
  at a block's backward when the heap grew), so freed activations do not set the resident peak.
* ``for_decoding``: what generation runs over. Where oneDNN's packed products pay
  (``ops.packed_linear.packing_pays``), the plain linear layers become ``PackedLinear`` and the head
  ``CPUHead``, whose products inside ``packed_decoding()`` go over packed copies of their weights;
  elsewhere ``use_decode_layout``: weights stored column-major for matrix-vector decoding.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers.embedding import ScaledEmbedding
from .layers.head import LMHead
from .layers.mlp import own_hooks
from .models.common.decoder import decoder_layers
from .ops import packed_linear
from .ops.head_loss import _cpu_lowp, chunked_cross_entropy


def _plain(weight: torch.Tensor) -> bool:
    """A plain tensor (not a distributed DTensor)."""
    from torch.distributed.tensor import DTensor

    return not isinstance(weight, DTensor) and not isinstance(getattr(weight, "data", None), DTensor)


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

    def attach(self, model) -> list:
        """Check (and maybe trim) when the gradient reaches each decoder block's output; returns the
        hook handles. Each forward through the first block starts a new mark."""
        layers = decoder_layers(model)

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

        return [layer.register_forward_hook(functools.partial(after_forward, i == 0))
                for i, (_, layer) in enumerate(layers)]


def _resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; ~10 us)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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

    In a bf16 step (CPU autocast: bf16 hidden states over the fp32 head) it also keeps the head's
    bf16 copy that the loss multiplies (``lowp``): cast into kept memory (22 ms for the 270M's
    262k x 640 table, 100 ms into fresh memory) once per optimizer step, not once per loss call.
    """

    def __init__(self):
        self.buf: Optional[torch.Tensor] = None
        self.ws: Optional[torch.Tensor] = None
        self.low: Optional[torch.Tensor] = None
        self._low_key: Optional[tuple] = None  # what ``low`` was cast from; None: stale
        # handed out and not yet accumulated into ``weight.grad``: a schedule that runs several losses'
        # forwards before their backwards (GPipe) must not have the next loss write into it
        self.pending = False
        self._watched: set[int] = set()

    def _accumulated(self, _param) -> None:
        self.pending = False
        self._low_key = None  # a gradient arrived: the optimizer may change the weight next

    def _watch(self, weight: torch.Tensor) -> None:
        if weight.requires_grad and id(weight) not in self._watched:
            weight.register_post_accumulate_grad_hook(self._accumulated)
            self._watched.add(id(weight))

    def lowp(self, hidden: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """``weight`` in the dtype the loss multiplies ``hidden`` in (bf16 hidden states of a CPU
        autocast step over an fp32 weight, ``head_loss._cpu_lowp``), kept and reused until it may be
        stale; None when the loss multiplies in fp32 (then nothing is kept).

        Stale after a gradient is accumulated into the weight (the optimizer step follows; fused
        AdamW updates in place without bumping the tensor's version), or when the weight's storage,
        version, shape or strides changed: so a trained head is cast once per step (once more per
        extra micro-batch), and evaluations between steps reuse that cast; a frozen head (LoRA) is
        cast once. A frozen weight changed through ``.data`` (no version bump) is not seen."""
        dt = _cpu_lowp(hidden, weight)
        if dt is None or not _plain(weight):
            return None
        self._watch(weight)
        key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), weight._version,
               tuple(weight.shape), weight.stride(), dt)
        if self.low is None or self._low_key != key:
            if self.low is None or self.low.shape != weight.shape or self.low.dtype != dt:
                self.low = None  # the old copy goes before the new one is allocated
                self.low = torch.empty(weight.shape, dtype=dt, device=weight.device)
            with torch.no_grad():
                self.low.copy_(weight)
            self._low_key = key
        return self.low

    def get(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        if weight.grad is not None or self.pending or not weight.requires_grad or weight.dtype != torch.float32 \
                or not _local(weight):
            return None
        self._watch(weight)
        self.buf = _kept(self.buf, tuple(weight.shape), weight.device)
        self.pending = True
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
    return torch.is_grad_enabled() and _plain(weight)


def _kept(buf: Optional[torch.Tensor], shape: tuple, device: torch.device) -> torch.Tensor:
    """``buf`` when it already has this shape and device, else a new fp32 one."""
    if buf is None or tuple(buf.shape) != shape or buf.device != device:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
    return buf



# ----------------------------------------------------------------------------------- head

HEAD_VOCAB_BLOCK = 1024  # fp32 logits in blocks of this many vocabulary rows ...
HEAD_BLOCKED_ROWS = (2, 512)  # ... for this many tokens (a single token's product is a GEMV: MKL's is faster)


class _BlockedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        v = weight.shape[0]
        out = h.new_empty(h.shape[0], v)
        for s in range(0, v, HEAD_VOCAB_BLOCK):
            e = min(s + HEAD_VOCAB_BLOCK, v)
            torch.mm(h, weight[s:e].t(), out=out[:, s:e])
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        gh = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.t() @ h if ctx.needs_input_grad[1] else None
        return gh, gw


def head_product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` (``weight [V, H]``): in vocabulary blocks on CPU for 2..512 fp32 tokens
    (bench/RESULTS.md: 13 tokens at 2 threads 214 -> 133 ms), with ``F.linear``'s backward;
    ``F.linear`` elsewhere (one token, other dtypes and devices, a column-major weight, under compile)."""
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    lo, hi = HEAD_BLOCKED_ROWS
    # row-major weights only: over the decode layout's column-major weight the blocks are strided
    # slices, ~15x slower than F.linear's one product (which then reads W^T contiguous)
    if not (hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32 and lo <= rows <= hi
            and weight.stride(-1) == 1 and not torch.compiler.is_compiling()):
        return F.linear(hidden, weight)
    z = _BlockedHead.apply(hidden.reshape(rows, hidden.shape[-1]), weight)
    return z.view(*hidden.shape[:-1], weight.shape[0])


class CPUHead(LMHead):
    """The LM head on CPU: blocked logits, and a training loss over kept buffers (see the module doc).

    ``trim``: a ``ReturnFreedMemory`` called before a training loss (the step's memory peak), or None."""

    buffers: Optional[HeadGradBuffer] = None
    trim = None

    def _packed(self) -> packed_linear.PackedWeight:
        """This head's packed weight for decoding (made on first use)."""
        if "packed" not in self.__dict__:
            self.packed = packed_linear.PackedWeight()
        return self.packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.matrix()
        if packed_linear.decoding() and packed_linear.applies(hidden, w):
            z = packed_linear.linear(hidden, w, None, self._packed())
        else:
            z = head_product(hidden, w)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
                      reduction: str = "sum") -> torch.Tensor:
        if reduction == "none" or self.buffers is None:
            return super().cross_entropy(hidden, labels, chunk_size=chunk_size, reduction=reduction)
        w = self.matrix()
        low = self.buffers.lowp(hidden, w)  # a bf16 step's kept bf16 head; None in fp32
        if not torch.is_grad_enabled():
            return chunked_cross_entropy(hidden, w, labels, softcap=self.softcap, chunk_size=chunk_size,
                                         reduction=reduction, weight_lowp=low)
        if self.trim is not None:
            self.trim()  # the forward's temporaries go back before the loss's [V, H] gradient arrives
        return chunked_cross_entropy(hidden, w, labels, softcap=self.softcap, chunk_size=chunk_size,
                                     reduction=reduction, weight_lowp=low, **self.buffers.loss_buffers(w, chunk_size))


# ----------------------------------------------------------------------------------- embedding

class _TiedLookup(torch.autograd.Function):
    """``embedding(ids) * factor`` whose backward adds the rows' gradient into ``weight.grad`` in place.

    The weight enters detached (no autograd edge): its only edge is the head's, whose gradient
    autograd accumulates first (the loss is the first node of the backward), so the lookup's rows are
    added into that gradient rather than summed with it out of place. ``anchor`` (an empty tensor
    requiring grad) makes the output part of the graph; it gets no gradient."""

    @staticmethod
    def forward(ctx, ids, weight, anchor, module):
        ctx.save_for_backward(ids)
        ctx.module = module
        return F.embedding(ids, weight, module.padding_idx) * module.factor()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        m = ctx.module
        w = m.weight
        rows = ids.reshape(-1)
        gr = g.reshape(-1, w.shape[1]).to(w.dtype) * m.factor()
        if m.padding_idx is not None:
            gr[rows == m.padding_idx] = 0
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.index_add_(0, rows, gr)
        return None, None, None, None


class LeanTiedEmbedding(ScaledEmbedding):
    """A trained token embedding tied to the LM head, whose gradient is added in place (``_TiedLookup``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(ids)
        anchor = torch.empty(0, device=self.weight.device, requires_grad=True)
        return _TiedLookup.apply(ids, self.weight.detach(), anchor, self)


def _embedding_as(cls: type, emb: ScaledEmbedding) -> ScaledEmbedding:
    """A ``cls`` embedding over ``emb``'s weight (the same parameter and settings)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.num_embeddings, new.embedding_dim, new.padding_idx = emb.num_embeddings, emb.embedding_dim, emb.padding_idx
    new.max_norm, new.norm_type, new.scale_grad_by_freq, new.sparse = None, 2.0, False, False
    new.scale = emb.scale
    new.weight = emb.weight
    return new


# ----------------------------------------------------------------------------------- decoding

class PackedLinear(nn.Linear):
    """An ``nn.Linear`` over the same parameters (same names) whose products inside
    ``packed_decoding()`` go over a packed copy of its weight (``ops.packed_linear``); exactly
    ``nn.Linear`` everywhere else (training, scoring, other dtypes, distributed weights)."""

    @classmethod
    def sharing(cls, lin: nn.Linear) -> "PackedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.bias = lin.bias
        new.training = lin.training
        new.packed = packed_linear.PackedWeight()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear.linear(x, self.weight, self.bias, self.packed)


def use_packed_linears(model: nn.Module) -> int:
    """Swap each plain CPU ``nn.Linear`` of ``model`` (no module hooks, a plain tensor weight) for a
    ``PackedLinear`` over the same parameters, and the head for ``CPUHead``. Idempotent; returns how
    many linear modules were swapped."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.device.type == "cpu" and _plain(child.weight)
             and not own_hooks(child)]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear.sharing(child))
    for_inference(model)
    return len(swaps)


def release_packed(model: nn.Module) -> int:
    """Free the packed weight copies ``for_decoding`` made (kept otherwise for the next generation):
    for a model that trains between generations (GRPO), so the copies (the weights' size again) do not
    sit beside the training step's memory. Returns how many copies were freed."""
    freed = 0
    for mod in model.modules():
        pw = mod.__dict__.get("packed")
        if isinstance(pw, packed_linear.PackedWeight) and pw.packed is not None:
            pw.clear()
            freed += 1
    return freed


def for_decoding(model: nn.Module) -> str:
    """Prepare ``model`` for generation on CPU: packed products where they pay (``use_packed_linears``;
    the loop then runs inside ``packed_decoding()``), else the column-major decode layout. Returns
    which: ``"packed"``, ``"column-major"``, or ``"none"`` off CPU."""
    if model.device.type != "cpu":
        return "none"
    if packed_linear.packing_pays():
        use_packed_linears(model)
        return "packed"
    use_decode_layout(model)
    return "column-major"


def use_decode_layout(model: torch.nn.Module) -> int:
    """Store every 2-D weight read by ``F.linear`` column-major (``[out, in]`` shape, ``[in, out]`` memory).

    Decoding one token is a matrix-vector product per weight, bound by streaming the weights. On
    CPU, MKL streams an ``x @ W_t`` product with ``W_t`` contiguous ~1.7x faster than ``F.linear``
    over a row-major ``W`` (the 262k x 640 tied head of Gemma 3 270M: 44 ms against 78 ms here,
    see bench/RESULTS.md). Values, shapes, parameter identity and ties are unchanged (the tied
    embedding gathers rows from the same strided storage); only the strides change, so training
    and saving still work. Idempotent; a no-op off CPU (cuBLAS reads either layout at full speed)
    and for sharded (DTensor) parameters. Returns how many parameters were re-strided.
    """
    from torch.distributed.tensor import DTensor

    done = 0
    seen: set[int] = set()
    with torch.inference_mode(False), torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            p = mod.weight
            if p is None or id(p) in seen or p.dim() != 2 or isinstance(p.data, DTensor) \
                    or p.device.type != "cpu" or p.stride() == (1, p.shape[0]):
                continue
            seen.add(id(p))
            p.data = p.data.t().contiguous().t()
            done += 1
    return done



# ----------------------------------------------------------------------------------- dtype

from .ops.cpu_caps import cpu_bf16_flags, native_bf16  # noqa: E402  (re-exported: the policy's inputs)


DTYPE_NAMES = {"auto": "auto", "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": None, "fp32": None}


def training_dtype(requested: Optional[str], device) -> Optional[torch.dtype]:
    """The autocast dtype of a training (and validation) step for ``--dtype requested`` on ``device``;
    None = plain fp32. Weights, optimizer state, norms, softmax and the loss stay fp32 either way.

    ``float32``/``fp32``: None. ``bfloat16``/``bf16``: bf16 (forced, even where it is slow).
    ``auto`` (default): bf16 on CUDA; on CPU bf16 where it is native (``native_bf16``), else fp32;
    fp32 on other devices."""
    key = (requested or "auto").lower()
    if key not in DTYPE_NAMES:
        from .errors import ConfigError

        raise ConfigError(f"--dtype {requested}: choose auto, float32 (fp32) or bfloat16 (bf16)")
    choice = DTYPE_NAMES[key]
    if choice != "auto":
        return choice
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu" and native_bf16():
        return torch.bfloat16
    return None


def describe_dtype(requested: Optional[str], device, chosen: Optional[torch.dtype]) -> str:
    """One line saying what ``training_dtype`` chose and why (for the run's log and metadata)."""
    kind = torch.device(device).type
    name = "bf16 autocast (fp32 master weights, norms, softmax and loss)" if chosen is not None else "fp32"
    why = ""
    if (requested or "auto").lower() == "auto" and kind == "cpu":
        flags = cpu_bf16_flags()
        why = (f": this CPU multiplies bf16 natively ({', '.join(flags)})" if chosen is not None else
               ": this CPU has no native bf16 (" + (f"{', '.join(flags)} found but slower than fp32"
                                                    if flags else "no amx_bf16 / avx512_bf16") + ")")
    return f"dtype {requested or 'auto'} -> {name} on {kind}{why}"


# ----------------------------------------------------------------------------------- apply

def for_inference(model: nn.Module) -> nn.Module:
    """On CPU: the blocked-logits head (``CPUHead``). A no-op elsewhere and for distributed heads."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, LMHead) and not isinstance(head, CPUHead) and head.weight.device.type == "cpu" \
            and _plain(head.weight):
        model.lm_head = CPUHead.sharing(head)
    return model


class TrainingPolicy:
    """What ``for_training`` applied to one model; ``remove()`` puts the plain modules back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.trim = ReturnFreedMemory.for_model(model)
        self._hooks = self.trim.attach(model) if self.trim is not None else []
        head = model.lm_head
        self.head = None
        self._trimmed_head = None
        if isinstance(head, LMHead) and _plain(head.weight):
            self.head = model.lm_head = CPUHead.sharing(head)
            self.head.buffers, self.head.trim = HeadGradBuffer(), self.trim
        elif head is not None and hasattr(type(head), "trim"):  # a sharded head with the same trim hook
            head.trim = self.trim
            self._trimmed_head = head
        emb = model.model.embed_tokens
        self.embedding = None
        if (type(emb) is ScaledEmbedding and head is not None and head.weight is emb.weight
                and emb.weight.requires_grad and _plain(emb.weight)):
            self.embedding = model.model.embed_tokens = _embedding_as(LeanTiedEmbedding, emb)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._trimmed_head is not None:
            self._trimmed_head.trim = None
        if self.head is not None and self.model.lm_head is self.head:
            self.model.lm_head = LMHead.sharing(self.head)
        if self.embedding is not None and self.model.model.embed_tokens is self.embedding:
            self.model.model.embed_tokens = _embedding_as(ScaledEmbedding, self.embedding)


def for_training(model: nn.Module) -> TrainingPolicy | None:
    """On CPU: the training policy (``CPUHead`` with kept buffers, ``LeanTiedEmbedding``, trims);
    None on other devices."""
    if model.device.type != "cpu":
        return None
    return TrainingPolicy(model)
