"""One attention interface, swappable backends, masks composed from small mask functions.

Document boundaries are data (``cu_seqlens`` or a padding mask turned into per-token document
ids), never guessed from positions. A query token ``q`` may read key ``k`` iff

    same_document(q, k) AND (causal(q, k) OR same_image(q, k)) AND (no window OR q - k < window)

where ``causal``/``window`` compare absolute stream indices (with a KV cache, keys carry the
indices they were written at), so a sliding window of ``w`` sees ``w`` keys including itself
(flash-attn: ``window_size=(w-1, 0)``). ``same_image`` is off unless the forward was given
multimodal group ids (``SeqInfo.groups``: -1 = text, ``g >= 0`` = the tokens of one image) AND the
layer lets them attend bidirectionally (``AttnCall.bidirectional_groups``: every layer in Gemma 3,
sliding layers in Gemma 4). The window stays one-sided (later tokens of the same image remain
visible), as the reference composes it: ``AND(window, OR(causal, blockwise))``.

Backends (``attn_backend=``): ``eager`` (explicit fp32 softmax, the reference and what hooks read),
``sdpa`` (torch SDPA; packed rows are attended per document so memory never grows with T^2),
``flex`` (torch flex_attention with a block mask from document ids) and ``flash`` (varlen
FlashAttention-2 on CUDA: the ``flash-attn`` package's ``flash_attn_varlen_func`` when installed,
else PyTorch's built-in kernel). ``auto`` picks ``flash`` where the flash-attn package is
installed, else ``sdpa``.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- mask functions
# Signature (b, h, q, kv) -> bool, as flex_attention's mask_mod; indices broadcast as tensors.

def causal_mask(q_idx: torch.Tensor, k_idx: torch.Tensor) -> MaskMod:
    return lambda b, h, q, kv: k_idx[kv] <= q_idx[q]


def document_mask(q_doc: torch.Tensor, k_doc: torch.Tensor) -> MaskMod:
    return lambda b, h, q, kv: q_doc[b, q] == k_doc[b, kv]


def sliding_window_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int) -> MaskMod:
    return lambda b, h, q, kv: q_idx[q] - k_idx[kv] < window


def same_group_mask(q_group: torch.Tensor, k_group: torch.Tensor) -> MaskMod:
    """Query and key belong to the same image (group id >= 0; -1 marks text)."""
    return lambda b, h, q, kv: (q_group[b, q] == k_group[b, kv]) & (q_group[b, q] >= 0)


def and_masks(*mods: MaskMod) -> MaskMod:
    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out & m(b, h, q, kv)
        return out

    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out | m(b, h, q, kv)
        return out

    return mod


def compose_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor,
                 window: int | None, single_doc: bool = False, q_group: torch.Tensor | None = None,
                 k_group: torch.Tensor | None = None) -> MaskMod:
    """``doc AND (causal OR same_group) AND window``; without groups, plain ``doc AND causal AND window``.

    q_idx/k_idx: [S]/[Sk] stream indices; q_doc/k_doc: [B, S]/[B, Sk] document ids (ignored when
    ``single_doc``); q_group/k_group: [B, S]/[B, Sk] image group ids (-1 = text) or None."""
    visible = causal_mask(q_idx, k_idx)
    if q_group is not None:
        visible = or_masks(visible, same_group_mask(q_group, k_group))
    mods = [visible]
    if not single_doc:
        mods.append(document_mask(q_doc, k_doc))
    if window is not None:
        mods.append(sliding_window_mask(q_idx, k_idx, window))
    return and_masks(*mods)


def bidirectional_group_mask(q_idx, k_idx, q_doc, k_doc, q_group, k_group, window: int | None,
                             single_doc: bool = False) -> MaskMod:
    """``doc AND (causal OR same_group) AND window``: the tokens of one image attend to each other in
    both directions, text stays causal, nobody crosses a document. The window is the one-sided
    ``q - k < w`` of the causal case (later tokens of the same image stay visible), as in the
    reference (Gemma 3 ``create_masks_for_vision_model``, Gemma 4 sliding layers)."""
    return compose_mask(q_idx, k_idx, q_doc, k_doc, window, single_doc, q_group, k_group)


def dense_mask_of(mod: MaskMod, batch: int, sq: int, sk: int, device) -> torch.Tensor:
    """Evaluate a mask function on the full grid: [B, 1, Sq, Sk] boolean (True = may attend)."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(sq, device=device)[None, None, :, None]
    kv = torch.arange(sk, device=device)[None, None, None, :]
    return mod(b, None, q, kv)


# ----------------------------------------------------------------------------- sequence layout

@dataclass
class SeqInfo:
    """Layout of one forward's tokens, computed once and shared by every layer.

    positions: [B, S] RoPE positions (restart at 0 in each document).
    doc:       [B, S] document id of each token (padding forms its own segments).
    idx:       [S] absolute stream index of each query (offset by what a cache already holds).
    cu_seqlens: document boundaries of the (single, B == 1) packed row, or None.
    single_doc: every row is one document starting at stream index 0 (plain causal).
    groups:    [B, S] multimodal group ids (-1 = text, g >= 0 = the tokens of one image), or None
               when the forward has no image tokens. Ids need not be unique across documents:
               the document mask keeps equal ids of different documents apart.
    """

    positions: torch.Tensor
    doc: torch.Tensor
    idx: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    single_doc: bool = False
    groups: torch.Tensor | None = None
    # dense masks already built this forward (every layer of one kind reads the same one), each kept with
    # the doc/idx/groups tensors it was built from. An init field: FSDP2 rebuilds dataclass inputs with
    # dataclasses.replace, and its copy then shares the masks (checked against the tensors on every use).
    masks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self):
        return tuple(self.doc.shape)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths.long(), output_size=total)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise InputError(f"cu_seqlens must be a 1-D tensor [0, ..., T]; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise InputError(f"cu_seqlens must be int32 or int64; got {cu_seqlens.dtype}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != total:
        raise InputError(f"cu_seqlens must start at 0 and end at the token count {total}; got {c[0]}..{c[-1]}")
    if any(b < a for a, b in zip(c, c[1:])):
        raise InputError("cu_seqlens must be non-decreasing")


def build_seq_info(
    batch: int,
    seqlen: int,
    device: torch.device,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    past_len: int = 0,
    groups: torch.Tensor | None = None,
) -> SeqInfo:
    """Turn the user's description of the batch into explicit positions and document ids.

    ``groups``: multimodal group id of every token (``[B, S]``, or ``[T]`` for a packed row), -1 for
    text; see ``SeqInfo.groups``."""
    idx = torch.arange(past_len, past_len + seqlen, device=device)
    if cu_seqlens is not None:
        if attention_mask is not None:
            if not bool(attention_mask.bool().all()):
                raise InputError("a packed row (cu_seqlens) marks padding as its own segment; "
                                 "an attention_mask with zeros cannot be combined with it")
            attention_mask = None  # all ones: boundaries come from cu_seqlens alone, never from the mask
        if batch != 1:
            raise InputError("cu_seqlens describes one packed row; flatten the batch to [1, T] first")
        cu = cu_seqlens.to(device)
        check_cu_seqlens(cu, seqlen)
        doc = doc_ids_from_cu_seqlens(cu, seqlen)
        starts = cu[:-1].long()[doc]
        positions = (torch.arange(seqlen, device=device) - starts)[None]
        lens = (cu[1:] - cu[:-1])
        info = SeqInfo(positions, doc[None], idx, cu.int(), int(lens.max()), single_doc=len(lens) == 1)
    elif attention_mask is not None:
        if attention_mask.shape != (batch, seqlen):
            raise InputError(f"attention_mask must be [B, S] = {(batch, seqlen)}; got {tuple(attention_mask.shape)}")
        m = attention_mask.to(device).bool()
        # real tokens form document 0 with positions 0..n-1 (what the unpadded row would get);
        # padding forms document -1, causal among itself, so no query row is ever empty
        doc = torch.where(m, 0, -1)
        positions = torch.where(m, m.long().cumsum(-1) - 1, (~m).long().cumsum(-1) - 1)
        info = SeqInfo(positions, doc, idx, single_doc=bool(m.all()))
        if info.single_doc and past_len:
            info.positions = positions + past_len
    else:
        doc = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        positions = idx[None].expand(batch, seqlen)
        info = SeqInfo(positions, doc, idx, single_doc=True)
    if position_ids is not None:
        if position_ids.numel() != batch * seqlen:
            raise InputError(f"position_ids must have {batch * seqlen} entries; got shape {tuple(position_ids.shape)}")
        info.positions = position_ids.to(device).reshape(batch, seqlen)
    if groups is not None:
        info.groups = check_groups(groups, batch, seqlen, device, past_len)
    return info


def check_groups(groups: torch.Tensor, batch: int, seqlen: int, device, past_len: int = 0) -> torch.Tensor | None:
    """Validated ``[B, S]`` int64 group ids, or None when no token belongs to an image."""
    if not isinstance(groups, torch.Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool \
            or groups.is_complex():
        raise InputError(f"mm_groups must be an integer tensor (-1 = text, >= 0 = image group); "
                         f"got {getattr(groups, 'dtype', type(groups).__name__)}")
    if groups.numel() != batch * seqlen:
        raise InputError(f"mm_groups must have {batch * seqlen} entries (one per token); got shape "
                         f"{tuple(groups.shape)}")
    g = groups.to(device).reshape(batch, seqlen).long()
    if g.numel() and int(g.min()) < -1:
        raise InputError(f"mm_groups must be -1 (text) or a group id >= 0; got {int(g.min())}")
    if not bool((g >= 0).any()):
        return None
    if past_len:
        raise InputError("image tokens (mm_groups >= 0) must come in the first call with a KV cache")
    return g


# ----------------------------------------------------------------------------- backends

@dataclass
class AttnCall:
    """Everything a backend needs besides q/k/v for one layer call."""

    info: SeqInfo
    k_doc: torch.Tensor  # [B, Sk]
    k_idx: torch.Tensor  # [Sk]
    window: int | None
    scale: float
    softcap: float | None
    keys_are_queries: bool  # no cache: keys are exactly this call's tokens
    tap: Callable | None = None  # eager only: tap(name, tensor) -> tensor for scores / pattern hooks
    bidirectional_groups: bool = False  # this layer lets the tokens of one image (info.groups) see each other

    @property
    def has_groups(self) -> bool:
        """The mask of this call is not causal: some image tokens see later tokens of their image."""
        return self.bidirectional_groups and self.info.groups is not None

    def group_ids(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(query groups [B, S], key groups [B, Sk]) when ``has_groups``, else None.

        Image tokens only come in a cache's first call (``check_groups``), so a key is one of this
        call's tokens iff its stream index is at least the first query's; older keys are text."""
        if not self.has_groups:
            return None
        g = self.info.groups
        if self.keys_are_queries:
            return g, g
        rel = self.k_idx - self.info.idx[0]
        inside = (rel >= 0) & (rel < g.shape[1])
        k_group = torch.where(inside[None], g[:, rel.clamp(0, g.shape[1] - 1)], -1)
        return g, k_group

    def mask_mod(self) -> MaskMod:
        groups = self.group_ids()
        q_group, k_group = groups if groups is not None else (None, None)
        return compose_mask(self.info.idx, self.k_idx, self.info.doc, self.k_doc, self.window,
                            self.info.single_doc, q_group, k_group)

    def per_forward(self, key: tuple, build: Callable[[], object]):
        """``build()``, shared by every layer call of this forward that asks with the same ``key``.

        When the keys are this forward's own tokens, a mask depends only on the forward's layout
        (kept on ``SeqInfo``) and the layer's window/groups, so it is built once per forward. With a
        KV cache or context-parallel keys, and while tracing under ``torch.compile``, it is built
        per call. Callers must not write into what it returns."""
        info = self.info
        if not (self.keys_are_queries and self.k_doc is info.doc and self.k_idx is info.idx) \
                or torch.compiler.is_compiling():
            return build()
        hit = info.masks.get(key)
        if hit is not None and hit[0] is info.doc and hit[1] is info.idx and hit[2] is info.groups:
            return hit[3]
        value = build()
        info.masks[key] = (info.doc, info.idx, info.groups, value)
        return value

    def dense_mask(self, batch: int, inverted: bool = False) -> torch.Tensor:
        """[B, 1, S, Sk] boolean mask (True = may attend; ``inverted``: True = masked out); one per
        forward and layer kind (``per_forward``)."""
        def build():
            m = dense_mask_of(self.mask_mod(), batch, len(self.info.idx), len(self.k_idx), self.k_idx.device)
            return ~m if inverted else m

        return self.per_forward(("dense", self.window, self.has_groups, batch, inverted), build)

    def needs_mask(self, sq: int, sk: int) -> bool:
        """False when every key is visible to every query (decode with a trimmed cache)."""
        if not self.info.single_doc or self.has_groups:
            return True
        if sq == 1:
            return self.window is not None and sk > self.window
        return True


def _softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap


def eager_attention(q, k, v, call: AttnCall, return_probs: bool = False):
    """Reference: explicit scores, softcap, mask, fp32 softmax. q [B,H,S,D], k/v [B,Hkv,Sk,D].

    Grouped-query heads: the ``g = H / Hkv`` query heads of one kv head are folded into the rows of
    one matmul (``[B, Hkv, g*S, D] @ [B, Hkv, D, Sk]``, a view of q) instead of repeating k/v
    ``g`` times; query head ``h`` reads kv head ``h // g`` as with ``repeat_interleave``."""
    B, H, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = H // Hkv
    scores = torch.matmul(q.reshape(B, Hkv, g * S, D), k.transpose(-1, -2)).view(B, H, S, Sk)
    scores.mul_(call.scale)  # a fresh tensor: scale (and mask, below) in place
    scores = _softcap(scores, call.softcap)
    if call.needs_mask(S, Sk):
        scores.masked_fill_(call.dense_mask(B, inverted=True), float("-inf"))
    if call.tap is not None:
        scores = call.tap("attn.hook_attn_scores", scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if call.tap is not None:
        probs = call.tap("attn.hook_pattern", probs)
    out = torch.matmul(probs.reshape(B, Hkv, g * S, Sk), v).view(B, H, S, v.shape[-1])
    return (out, probs) if return_probs else (out, None)


def _sdpa(q, k, v, mask, is_causal, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def _document_group_mask(groups: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, L, L] mask of one document of a packed row whose tokens carry image groups [B, L]."""
    i = torch.arange(groups.shape[1], device=groups.device)
    mod = compose_mask(i, i, groups, groups, window, single_doc=True, q_group=groups, k_group=groups)
    return dense_mask_of(mod, groups.shape[0], len(i), len(i), groups.device)


def _cat_seq(outs: list) -> torch.Tensor:
    """Documents' outputs [B, H, L_i, D] -> [B, H, S, D] laid out in memory as [B, S, H, D], the
    layout ``o_proj`` reads (``transpose(1, 2).reshape``): then that reshape is a view, not a copy,
    and the tensor o_proj saves for its backward is the one attention saved. One document: no copy
    (sdpa's CPU and CUDA kernels give their output the query's layout, which is [B, S, H, D] here)."""
    if len(outs) == 1:
        return outs[0]
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)


def sdpa_attention(q, k, v, call: AttnCall, return_probs: bool = False):
    if call.softcap is not None:  # SDPA has no score modifier: softcapped layers use the reference
        return eager_attention(q, k, v, call, return_probs)
    sq, sk = q.shape[2], k.shape[2]
    info = call.info
    if info.cu_seqlens is not None and call.keys_are_queries:
        # packed row: attend document by document; memory O(sum L_i^2) (O(L*w) when windowed), not O(T^2)
        outs = []
        cu = info.cu_seqlens.tolist()
        # documents holding image tokens get their explicit (non-causal) mask; one host sync for all
        with_images = set(info.doc[0][info.groups[0] >= 0].unique().tolist()) if call.has_groups else set()
        for d, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
            if e == s:
                continue
            qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
            if d in with_images:
                mask = _document_group_mask(info.groups[:, s:e], call.window)
                outs.append(_sdpa(qs, ks, vs, mask, False, call.scale))
            elif call.window is None or e - s <= call.window:
                outs.append(_sdpa(qs, ks, vs, None, True, call.scale))
            else:
                outs.append(_sdpa(qs, ks, vs, _window_mask(e - s, call.window, q.device), False, call.scale))
        return _cat_seq(outs), None
    plain_causal = info.single_doc and call.keys_are_queries and not call.has_groups
    if plain_causal and (call.window is None or sq <= call.window):
        return _sdpa(q, k, v, None, True, call.scale), None
    if not call.needs_mask(sq, sk):
        return _sdpa(q, k, v, None, False, call.scale), None
    return _sdpa(q, k, v, call.dense_mask(q.shape[0]), False, call.scale), None


_FLEX_CACHE: dict = {}


def flex_attention_backend(q, k, v, call: AttnCall, return_probs: bool = False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # compiled on CUDA (the point of flex); on CPU compiling costs ~1 min per new shape, so the
    # uncompiled reference path runs unless GEMMAFORGE_FLEX_COMPILE=1
    compile_it = q.device.type == "cuda" or os.environ.get("GEMMAFORGE_FLEX_COMPILE") == "1"
    key = ("fn", compile_it)
    if key not in _FLEX_CACHE:
        _FLEX_CACHE[key] = torch.compile(flex_attention, dynamic=False) if compile_it else flex_attention
    B, _, S, _ = q.shape
    Sk = k.shape[2]
    if compile_it and q.device.type == "cuda" and S < 128:
        # short query blocks go to inductor's flex-decoding template, which found no valid kernel
        # configuration for a 72-token packed row on an H200 with torch 2.11 (NoValidChoicesError);
        # sdpa computes the same masked attention (bench/RESULTS.md, GPU section)
        return sdpa_attention(q, k, v, call)
    block = call.per_forward(("flex", B, S, Sk, call.window, call.has_groups, str(q.device)),
                             lambda: create_block_mask(call.mask_mod(), B, None, S, Sk, device=q.device,
                                                       _compile=compile_it))
    cap = call.softcap
    score_mod = None if cap is None else (lambda s, b, h, qi, ki: torch.tanh(s / cap) * cap)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        out = _FLEX_CACHE[key](q, k, v, score_mod=score_mod, block_mask=block, scale=call.scale,
                               enable_gqa=q.shape[1] != k.shape[1])
    return out, None


def flash_available(head_dim: int, device: torch.device) -> bool:
    """The ``flash-attn`` package can run here (what ``auto`` picks ``flash`` for)."""
    return device.type == "cuda" and head_dim <= 256 and _flash_attn_installed()


@functools.lru_cache(maxsize=None)
def _flash_attn_installed() -> bool:
    """Tried once: a failed import is not cached by Python and would search sys.path on every call."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def builtin_flash_available(head_dim: int, device: torch.device) -> bool:
    """PyTorch's own FlashAttention-2 kernel (``aten._flash_attention_forward``, varlen with windows)
    can run here: a CUDA build with it, an sm80+ device, head_dim <= 256 and a multiple of 8."""
    if device.type != "cuda" or head_dim > 256 or head_dim % 8:
        return False
    return _builtin_flash_device(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _builtin_flash_device(index: int) -> bool:
    """Asked once per device (every attention call of every layer goes through this)."""
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(index) >= (8, 0)


def _half_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype flash kernels take for this call: q's own, or CUDA autocast's (the projections'
    outputs are then bf16 but RoPE/norms may have returned fp32); None when neither is 16-bit."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return q.dtype
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return None


def flash_varlen(qt, kt, vt, cu_seqlens, max_seqlen: int, window: int | None, scale: float):
    """Causal varlen attention of ``[T, H, D]`` / ``[T, Hkv, D]`` tokens split into documents by
    ``cu_seqlens`` (int32), with PyTorch's built-in FlashAttention-2 kernel: one kernel for every
    document of the stream, sliding window ``w`` as ``(w - 1, 0)``, grouped-query heads native;
    differentiable (aten's ``_flash_attention_backward``). Returns ``[T, H, D]``."""
    left, right = (None, None) if window is None else (window - 1, 0)
    return _ATEN_FLASH_FORWARD(qt, kt, vt, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False,
                               scale=scale, window_size_left=left, window_size_right=right)[0]


_ATEN_FLASH_FORWARD = torch.ops.aten._flash_attention_forward


def flash_attention_backend(q, k, v, call: AttnCall, return_probs: bool = False):
    """Packed rows (``cu_seqlens``, keys = queries, no image groups): ``flash_attn_varlen_func`` when
    the flash-attn package is installed, else PyTorch's built-in varlen FlashAttention-2
    (``flash_varlen``; no softcap there). Anything else (head_dim > 256 as on Gemma 4's global layers,
    fp32 without autocast, a KV cache, image groups) goes to sdpa."""
    info = call.info
    dt = _half_dtype(q)
    if dt is None or info.cu_seqlens is None or not call.keys_are_queries or call.has_groups:
        return sdpa_attention(q, k, v, call, return_probs)
    package = flash_available(q.shape[-1], q.device)
    if not package and not (builtin_flash_available(q.shape[-1], q.device) and call.softcap is None):
        return sdpa_attention(q, k, v, call, return_probs)
    qt, kt, vt = (t[0].transpose(0, 1).to(dt) for t in (q, k, v))  # [T, H, D]
    if package:
        from flash_attn import flash_attn_varlen_func

        window = (-1, -1) if call.window is None else (call.window - 1, 0)
        out = flash_attn_varlen_func(
            qt, kt, vt, info.cu_seqlens, info.cu_seqlens, info.max_seqlen, info.max_seqlen,
            softmax_scale=call.scale, causal=True, window_size=window, softcap=call.softcap or 0.0,
        )
    else:
        out = flash_varlen(qt, kt, vt, info.cu_seqlens, info.max_seqlen, call.window, call.scale)
    return out.transpose(0, 1)[None], None


BACKENDS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_backend,
    "flash": flash_attention_backend,
}


def resolve_backend(name: str | None, device: torch.device, head_dim: int = 256) -> str:
    name = name or "auto"
    if name == "auto":
        if flash_available(head_dim, device):
            return "flash"
        return "sdpa"
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    return name


def attention(q, k, v, call: AttnCall, backend: str = "sdpa", return_probs: bool = False):
    """q [B,H,S,D], k/v [B,Hkv,Sk,D] -> ([B,H,S,D], probs or None)."""
    if return_probs:
        return eager_attention(q, k, v, call, True)
    return BACKENDS[backend](q, k, v, call)


