"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, seed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cpu_policy import use_decode_layout
from ..errors import InputError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_on: int | None = None
    ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token from fp32 logits ``[V]``; temperature 0 is greedy (argmax)."""
    if temperature is None or temperature <= 0:
        return int(torch.argmax(logits))
    z = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < z.numel():
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_z, order = torch.sort(z, descending=True)
        probs = torch.softmax(sorted_z, -1)
        # drop tokens once the mass *before* them already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(0, order, sorted_z)
    probs = torch.softmax(z, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: set[int] | None = None, on_token=None) -> GenerationStats:
    """Token-level generation for one prompt. ``on_token(id)`` is called for each new token.

    On CPU the model's weights are first put in the decode layout (``use_decode_layout``)."""
    use_decode_layout(model)
    with torch.inference_mode():
        return _generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                             on_token)


def _generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                  on_token) -> GenerationStats:
    cfg = model.config
    if not prompt_ids:
        raise InputError("empty prompt")
    total = len(prompt_ids) + max_new_tokens
    if len(prompt_ids) > cfg.max_position_embeddings:
        raise InputError(f"prompt of {len(prompt_ids)} tokens is longer than the model's context "
                         f"({cfg.max_position_embeddings})")
    max_new_tokens = min(max_new_tokens, cfg.max_position_embeddings - len(prompt_ids))
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    stop_ids = set(stop_ids if stop_ids is not None else cfg.eos_token_id)
    dev = model.device
    cache = model.new_cache(min(total, cfg.max_position_embeddings))
    stats = GenerationStats(prompt_tokens=len(prompt_ids))

    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    h = model(ids, cache=cache, return_hidden=True)
    logits = model.logits(h[:, -1])[0]
    stats.prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = sample_next(logits.float().cpu() if gen is not None else logits, temperature, top_k, top_p, gen)
        if nxt in stop_ids:
            stats.stopped_on = nxt
            break
        stats.ids.append(nxt)
        stats.new_tokens += 1
        if on_token is not None:
            on_token(nxt)
        if stats.new_tokens == max_new_tokens:
            break
        h = model(torch.tensor([[nxt]], device=dev), cache=cache, return_hidden=True)
        logits = model.logits(h[:, -1])[0]
    stats.decode_s = time.perf_counter() - t0
    return stats


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_token=None, return_stats: bool = False):
    """Continue ``prompt``; return the continuation text (stops at EOS or ``<end_of_turn>``)."""
    ids = tokenizer.encode(prompt)
    stop = set(getattr(tokenizer, "stop_ids", None) or []) | set(model.config.eos_token_id)
    stats = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop_ids=stop, on_token=on_token)
    text = tokenizer.decode(stats.ids)
    return (text, stats) if return_stats else text
