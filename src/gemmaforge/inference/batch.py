"""Batched generation: many prompts at once, ragged, with no padding in the prefill.

    texts = generate_batch(model, tok, ["The capital of France is", "def fib(n):"], max_new_tokens=32)
    rows = generate_batch_ids(model, [ids1, ids2, ids3], max_new_tokens=32, stop_ids={1, 106})

How it runs:

* **Prefill**: every prompt in one packed row (``cu_seqlens``): no token attends across prompts,
  positions restart per prompt, no padding is computed. The keys of this call are its queries, so
  attention runs per prompt as in training (``sdpa`` causal per document, varlen flash on CUDA).
  Only each prompt's last hidden state goes through the LM head.
* **Decode**: one token per live row per step, ``[B, 1]``, through ``RaggedKVCache``: each row's keys
  are stored right-aligned (row ``b``'s token at position ``p`` sits at stream index
  ``P - len_b + p``, ``P`` the longest prompt), so every row's next token has the same stream index
  and the causal and sliding-window masks (``q - k < w``) hold per row; the slots before a short
  row's first token carry document id -1 and are masked out. RoPE positions are each row's own
  (``position_ids``). Sliding layers keep the last ``w - 1`` keys as the single-prompt ``KVCache``
  does (in a buffer with some slack, shifted down when full).
* **Rows leave**: a row that meets one of its stop ids (or reaches ``max_new_tokens``) is dropped
  from the batch (its cache rows removed), so later steps compute only live rows.
* **Sampling**: temperature 0 is greedy (argmax). Otherwise each row has its own ``torch.Generator``:
  with ``seed`` an int, row ``i`` is seeded with ``row_seed(seed, i)``; ``seed`` may also be a list
  of one seed per row. A row's draws therefore do not depend on the other rows: row ``i`` samples
  as ``generate_ids(prompt_i, seed=row_seed(seed, i))`` does (up to the last bits of batched
  arithmetic), whatever else is in the batch. ``seed=None`` draws from torch's global generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..cpu_policy import for_decoding
from ..ops.packed_linear import packed_decoding
from ..errors import InputError
from .generate import check_sampling, sample_next, stop_ids_of

__all__ = ["generate_batch", "generate_batch_ids", "row_seed", "RaggedKVCache", "BatchStats"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s generator in a batch sampled with ``seed`` (SplitMix64 of both, 63 bits):
    distinct rows and distinct seeds give unrelated streams (``seed + 1`` is not the next row's seed)."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(row)) >> 1


class RaggedKVCache:
    """The KV cache of a batch of rows of different lengths (see the module doc).

    Built for prompts of ``lengths``; the first forward through it must be their packed prefill
    (``cu_seqlens`` of those lengths), every later one ``[B, S]`` new tokens of the rows still in
    the batch (``keep_rows`` drops the others). Per layer it holds ``k``/``v`` ``[B, Hkv, cap, D]``,
    a document id per slot (0: a token of the row, -1: before the row's first token) and the stream
    index of slot 0. Full layers have room for the longest prompt plus ``max_new`` tokens; sliding
    layers keep the last ``w - 1`` keys (what the next query can see), in a buffer of
    ``w - 1 + min(slack, w - 1)`` slots shifted down when full."""

    stateful = True  # keeps what each call adds: a layer must not run twice for one call

    def __init__(self, windows: list[int | None], lengths: Sequence[int], max_new: int, slack: int = 64):
        if not lengths or min(lengths) < 1:
            raise InputError("every prompt needs at least one token")
        self.windows = list(windows)
        self.lengths = [int(n) for n in lengths]
        self.longest = max(self.lengths)
        self.max_new = int(max_new)
        self.slack = max(1, int(slack))
        self.seen = 0  # stream index of the next token (after the prefill: the longest prompt)
        self.prefilled = False
        n = len(windows)
        self._k: list[torch.Tensor | None] = [None] * n
        self._v: list[torch.Tensor | None] = [None] * n
        self._doc: list[torch.Tensor | None] = [None] * n
        self._base = [0] * n  # stream index of slot 0
        self._len = [0] * n  # slots filled

    @property
    def single_doc(self) -> bool:
        """False while some row's slots include the masked space before its first token: the model
        must then apply the document mask to cached keys (``CausalLM.make_context``)."""
        return not self.prefilled or min(self.lengths) == self.longest

    def _keep(self, layer: int) -> int | None:
        w = self.windows[layer]
        return None if w is None else max(w - 1, 0)

    def _capacity(self, layer: int) -> int:
        total = self.longest + self.max_new
        keep = self._keep(layer)
        # slack: at most the window (a shift then copies at most one slot per step on average)
        return total if keep is None else min(total, keep + max(1, min(self.slack, keep)))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, idx: torch.Tensor):
        if not self.prefilled:
            self._prefill(layer, k, v)
            return k, v, doc, idx  # the prefill's keys are its own queries (attention per prompt)
        return self._append(layer, k, v)

    def _prefill(self, layer, k, v):
        B = len(self.lengths)
        _, H, T, D = k.shape
        if T != sum(self.lengths):
            raise ValueError(f"RaggedKVCache: prefill of {T} tokens, prompts hold {sum(self.lengths)}")
        P, keep, cap = self.longest, self._keep(layer), self._capacity(layer)
        base = 0 if keep is None else max(0, P - keep)  # the first stream index a later query can see
        K = k.new_zeros(B, H, cap, D)
        V = v.new_zeros(B, H, cap, D)
        docs = torch.full((B, cap), -1, dtype=torch.long, device=k.device)
        start = 0
        for b, n in enumerate(self.lengths):
            first = P - n  # stream index of the row's first token
            lo = max(first, base)  # stream index of the first token kept
            take = P - lo
            if take > 0:
                src = start + (lo - first)
                K[b, :, lo - base:P - base] = k[0, :, src:src + take]
                V[b, :, lo - base:P - base] = v[0, :, src:src + take]
                docs[b, lo - base:P - base] = 0
            start += n
        self._k[layer], self._v[layer], self._doc[layer] = K, V, docs
        self._base[layer], self._len[layer] = base, P - base

    def _append(self, layer, k, v):
        K, V, docs = self._k[layer], self._v[layer], self._doc[layer]
        S = k.shape[2]
        n, keep = self._len[layer], self._keep(layer)
        if n + S > K.shape[2]:
            if keep is None or keep + S > K.shape[2]:
                raise ValueError(f"KV cache full: {n + S} tokens > capacity {K.shape[2]}")
            # a sliding layer: move the last ``keep`` slots to the front (one copy every ``slack`` steps)
            cut = n - keep
            K[:, :, :keep] = K[:, :, cut:n].clone()
            V[:, :, :keep] = V[:, :, cut:n].clone()
            docs[:, :keep] = docs[:, cut:n].clone()
            self._base[layer] += cut
            n = keep
        K[:, :, n:n + S] = k
        V[:, :, n:n + S] = v
        docs[:, n:n + S] = 0
        n += S
        self._len[layer] = n
        lo = 0 if keep is None else max(0, n - keep - S)  # what this call's queries can see
        base = self._base[layer]
        idx = torch.arange(base + lo, base + n, device=K.device)
        return K[:, :, lo:n], V[:, :, lo:n], docs[:, lo:n], idx

    def advance(self, n: int) -> None:
        if not self.prefilled:
            self.prefilled = True
            self.seen = self.longest
        else:
            self.seen += n

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the current batch, in this order)."""
        sel = torch.as_tensor(list(rows), dtype=torch.long)
        for i in range(len(self.windows)):
            if self._k[i] is not None:
                dev = self._k[i].device
                s = sel.to(dev)
                self._k[i] = self._k[i].index_select(0, s)
                self._v[i] = self._v[i].index_select(0, s)
                self._doc[i] = self._doc[i].index_select(0, s)
        self.lengths = [self.lengths[r] for r in rows]

    def stored_tokens(self, layer: int) -> int:
        return self._len[layer]


@dataclass
class BatchStats:
    """What one batched generation did: per row the new ids and the stop id met (None: length)."""

    prompt_tokens: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    stopped_on: list[int | None] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # decode forwards

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.ids)

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.new_tokens / t if t > 0 else float("nan")


def _row_generators(seed, n: int, device) -> list[torch.Generator | None]:
    if seed is None:
        return [None] * n
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise InputError(f"seed: {len(seed)} seeds for {n} prompts (give one per prompt, or one int)")
        seeds = list(seed)
        for s in seeds:
            check_sampling(seed=s)
    else:
        check_sampling(seed=seed)
        seeds = [row_seed(seed, i) for i in range(n)]
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _stop_sets(stop_ids, n: int, default: set[int]) -> list[set[int]]:
    if stop_ids is None:
        return [set(default)] * n
    items = list(stop_ids)
    if items and all(isinstance(s, (set, frozenset, list, tuple)) for s in items):
        if len(items) != n:
            raise InputError(f"stop_ids: {len(items)} sets for {n} prompts (give one per prompt, or one set)")
        return [set(int(x) for x in s) for s in items]
    return [set(int(x) for x in items)] * n


def generate_batch_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int | Sequence[int] | None = None, stop_ids=None, on_step=None,
                       return_stats: bool = False, inference_mode: bool = True):
    """New token ids for each prompt (a list of token-id lists), in the prompts' order.

    ``stop_ids``: one set for every row, or one set per row; a row ends when it samples one of them
    (not included in its ids) or after ``max_new_tokens`` (or the model's context). Default: the
    config's EOS. ``seed``: an int (row ``i`` uses ``row_seed(seed, i)``) or one seed per row.
    ``on_step(rows, tokens)`` is called after each step with the indices (into ``prompt_ids``) of the
    rows that got a new token and those tokens. ``return_stats=True`` returns ``BatchStats``.
    On CPU the model is first prepared for decoding (``cpu_policy.for_decoding``). ``inference_mode=False``
    runs under ``torch.no_grad()`` instead of ``torch.inference_mode()``: for a model that trains next
    (GRPO rollouts), whose buffers made in the forward (FSDP2's gathered parameters, kept head buffers)
    must not be inference tensors."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, None if isinstance(seed, (list, tuple)) else seed)
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts:
        return BatchStats() if return_stats else []
    cfg = model.config
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i}: empty (no token ids)")
        if len(p) > cfg.max_position_embeddings:
            raise InputError(f"prompt {i}: {len(p)} tokens is longer than the model's context "
                             f"({cfg.max_position_embeddings})")
    gens = _row_generators(seed, len(prompts), model.device)
    stops = _stop_sets(stop_ids, len(prompts), set(_as_list(getattr(cfg, "eos_token_id", None))))
    for_decoding(model)
    with torch.inference_mode() if inference_mode else torch.no_grad(), packed_decoding():
        stats = _run(model, prompts, max_new_tokens, temperature, top_k, top_p, gens, stops, on_step)
    return stats if return_stats else stats.ids


def _as_list(x) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _pick(logits: torch.Tensor, rows: list[int], temperature, top_k, top_p, gens) -> list[int]:
    """The next token of each live row from its logits ``[B, V]``."""
    if temperature is None or temperature <= 0:
        return torch.argmax(logits, dim=-1).tolist()
    z = logits.float().cpu()
    return [sample_next(z[j], temperature, top_k, top_p, gens[r]) for j, r in enumerate(rows)]


def _run(model, prompts, max_new_tokens, temperature, top_k, top_p, gens, stops, on_step) -> BatchStats:
    cfg = model.config
    dev = model.device
    n = len(prompts)
    lengths = [len(p) for p in prompts]
    # each row stops at the context's end, as single-prompt generation does
    budget = [min(max_new_tokens, cfg.max_position_embeddings - L) for L in lengths]
    stats = BatchStats(prompt_tokens=lengths, ids=[[] for _ in range(n)], stopped_on=[None] * n)
    windows = [cfg.window_for(t) for t in cfg.layer_types]
    cache = RaggedKVCache(windows, lengths, max(budget))

    t0 = time.perf_counter()
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device=dev)
    h = model(flat, cu_seqlens=cu, cache=cache, return_hidden=True)  # [T, hidden]
    last = (cu[1:] - 1).long()
    logits = model.logits(h.index_select(0, last))  # [B, V]
    stats.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = list(range(n))  # live rows, in cache order
    pos = torch.tensor(lengths, dtype=torch.long, device=dev)  # next RoPE position of each live row
    while rows:
        picks = _pick(logits, rows, temperature, top_k, top_p, gens)
        keep, fed, got_rows, got = [], [], [], []
        for j, (r, t) in enumerate(zip(rows, picks)):
            if budget[r] <= 0:  # a prompt that fills the context: no new token, as in single-prompt generation
                continue
            if t in stops[r]:
                stats.stopped_on[r] = t
                continue
            stats.ids[r].append(t)
            got_rows.append(r)
            got.append(t)
            if len(stats.ids[r]) < budget[r]:
                keep.append(j)
                fed.append(t)
        if on_step is not None and got_rows:
            on_step(got_rows, got)
        if not keep:
            break
        if len(keep) < len(rows):  # finished rows leave the batch
            cache.keep_rows(keep)
            rows = [rows[j] for j in keep]
            pos = pos[torch.tensor(keep, device=dev)]
        ids = torch.tensor(fed, dtype=torch.long, device=dev)[:, None]
        h = model(ids, position_ids=pos[:, None], cache=cache, return_hidden=True)  # [B, 1, hidden]
        logits = model.logits(h[:, -1])
        pos = pos + 1
        stats.steps += 1
    stats.decode_s = time.perf_counter() - t0
    return stats


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
                   return_stats: bool = False, on_step=None):
    """Continue each text prompt; returns the continuations (special tokens left out), in order.

    Each row stops at the tokenizer's stop ids (EOS, ``<end_of_turn>``; ``stop_ids_of``) or after
    ``max_new_tokens``. Row ``i`` greedily gives what ``generate(model, tokenizer, prompts[i])`` gives;
    sampled, what ``generate(..., seed=row_seed(seed, i))`` gives. ``return_stats=True`` returns
    ``(texts, BatchStats)``."""
    if isinstance(prompts, str):
        raise InputError("generate_batch takes a list of prompts (got one str: use generate)")
    encoded = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i}: expected a str, got {type(p).__name__}")
        encoded.append(tokenizer.encode(p))  # BOS first: an empty prompt generates from BOS alone
    stats = generate_batch_ids(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids_of(model, tokenizer),
                               on_step=on_step, return_stats=True)
    texts = [decode_reply(tokenizer, ids) for ids in stats.ids]
    return (texts, stats) if return_stats else texts


def decode_reply(tokenizer, ids: list[int]) -> str:
    """A reply's text as ``generate`` returns it (``TextStream``: special and markup tokens left out)."""
    from .generate import TextStream

    stream = TextStream(tokenizer)
    for i in ids:
        stream.push(i)
    return stream.finish()
