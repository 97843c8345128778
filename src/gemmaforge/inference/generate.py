"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, seed).

``generate_ids`` is the token-level loop (one prefill, then one token per step through the KV cache);
``generate`` continues a text prompt; ``TextStream`` turns the ids of a reply into text pieces as they
come (whole characters only, special tokens skipped), for printing a reply while it is generated.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from ..cpu_policy import for_decoding
from ..ops.packed_linear import packed_decoding
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


def sampling_problem(name: str, value) -> str | None:
    """Why ``value`` is not a usable value of the sampling setting ``name`` (None when it is).

    ``max_new_tokens``: an int >= 1; ``temperature``: a finite number >= 0 (0 is greedy);
    ``top_k``: None or an int >= 1; ``top_p``: None or a number in (0, 1]; ``seed``: None or an int."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name == "max_new_tokens":
        return None if is_int and value >= 1 else "must be a whole number >= 1"
    if name == "temperature":
        return None if is_real and math.isfinite(value) and value >= 0 else "must be a number >= 0 (0 is greedy)"
    if value is None:
        return None
    if name == "top_k":
        return None if is_int and value >= 1 else "must be a whole number >= 1"
    if name == "top_p":
        return None if is_real and 0 < value <= 1 else "must be a number in (0, 1]"
    if name == "seed":
        return None if is_int else "must be a whole number"
    raise ValueError(f"unknown sampling setting {name!r}")


def check_sampling(max_new_tokens=1, temperature=0.0, top_k=None, top_p=None, seed=None) -> None:
    """Raise ``InputError`` (naming the setting and its value) for a nonsensical sampling setting."""
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k),
                        ("top_p", top_p), ("seed", seed)):
        why = sampling_problem(name, value)
        if why:
            raise InputError(f"{name}={value!r}: {why}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits ``[V]``: from ``softmax(logits / temperature)`` restricted to the
    ``top_k`` most likely tokens, then to the smallest set of them holding ``top_p`` of the probability
    (the nucleus). Temperature 0 is greedy (argmax: top-k and top-p change nothing)."""
    if temperature is None or temperature <= 0:
        return int(torch.argmax(logits))
    z = logits.float()
    z = (z - z.max()) / temperature  # the top token stays at 0: no overflow for a tiny temperature
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
                 stop_ids: set[int] | None = None, on_token=None, media: dict | None = None) -> GenerationStats:
    """Token-level generation for one prompt. ``on_token(id)`` is called for each new token.
    ``media``: the prompt's media inputs (``pixel_values``...: a processor's), read by the prefill.

    On CPU the model is first prepared for decoding (``cpu_policy.for_decoding``).
    Nonsensical sampling settings raise ``InputError`` (``check_sampling``)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    for_decoding(model)
    with torch.inference_mode(), packed_decoding():
        return _generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                             on_token, media)


def _generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                  on_token, media=None) -> GenerationStats:
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
    media = {k: v.to(dev) for k, v in (media or {}).items()}
    h = model(ids, cache=cache, return_hidden=True, **media)
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


def stop_ids_of(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's (EOS, ``<end_of_turn>``) and the model config's EOS."""
    eos = getattr(model.config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return set(getattr(tokenizer, "stop_ids", None) or []) | set(eos)


class TextStream:
    """The text of a growing list of token ids, handed out piece by piece as the ids come.

        stream = TextStream(tokenizer, on_text=lambda s: print(s, end="", flush=True))
        for i in ids: stream.push(i)
        text = stream.finish()          # the decoded text: the pieces, joined

    Only whole characters come out: a character split over byte tokens (``<0xF0>`` ...) is held back
    until its last byte arrives. Special tokens (``<end_of_turn>``, ``<pad>`` ...) give no text, nor do
    Gemma's markup tokens that a GGUF vocabulary does not flag special (``CONTROL_TOKENS``:
    ``<start_of_image>`` ...). Each step decodes only a short window (the ids since the previous piece,
    plus the piece before them for the tokenizer's context), so a long reply costs O(length) decoding.
    ``ids`` holds the ids that make the text."""

    CONTROL_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "[multimodal]",
                      "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>")

    def __init__(self, tokenizer, on_text=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.skip_special_tokens = skip_special_tokens
        lookup = getattr(tokenizer, "token_to_id", None)
        self._drop = set()
        if skip_special_tokens and lookup is not None:
            self._drop = {i for i in map(lookup, self.CONTROL_TOKENS) if i is not None}
        self.ids: list[int] = []
        self.text = ""  # what was handed out so far
        self._prefix = 0  # window start: the ids of the previous piece
        self._read = 0  # ids before this one are handed out

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            if self.on_text is not None:
                self.on_text(piece)

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes (often '', e.g. for a partial character)."""
        if int(token_id) in self._drop:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if now.endswith("\ufffd"):  # perhaps a character whose next bytes are still to come
            return ""
        if now.startswith(before):
            piece = now[len(before):]
        else:  # bytes that never made a character spoiled the window: the new ids on their own
            piece = self._decode(self.ids[self._read:])
        if not piece:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self._emit(piece)
        return piece

    def finish(self) -> str:
        """Hand out what is held back (an incomplete character at the end comes out as U+FFFD);
        returns the whole text, ``decode(ids)`` but for such an end: ``decode`` turns every byte of a
        run of byte tokens into U+FFFD when the run ends mid-character, the text keeps the whole ones."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            self._emit(full[len(self.text):])
        else:
            before = self._decode(self.ids[self._prefix:self._read])
            now = self._decode(self.ids[self._prefix:])
            self._emit(now[len(before):] if now.startswith(before) else self._decode(self.ids[self._read:]))
        self._prefix = self._read = len(self.ids)
        return self.text


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_token=None, return_stats: bool = False, on_text=None, images=None):
    """Continue ``prompt``; return the continuation text (stops at EOS or ``<end_of_turn>``; special
    tokens are not in the text). ``on_token(id)`` gets each new id, ``on_text(piece)`` each new piece
    of text as soon as it is whole (the pieces joined are the returned text).

    ``images`` (paths or PIL images; ``tokenizer`` is then the model's processor, ``load_processor``):
    one per ``<start_of_image>`` marker of the prompt; a prompt without markers gets them first."""
    media = None
    if images:
        ids, media = prompt_with_media(model, tokenizer, text=prompt, images=images)
    else:
        ids = tokenizer.encode(prompt)  # BOS first: an empty prompt generates from BOS alone
    return _generate_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, on_token,
                          on_text, return_stats, media)


def prompt_with_media(model, processor, text=None, messages=None, images=None) -> tuple[list[int], dict]:
    """``(prompt ids, media inputs)`` of a prompt with media, through the model's processor."""
    specs = model.media_specs() if hasattr(model, "media_specs") else []
    if not specs:
        raise InputError(f"images given to a text-only model ({type(model).__name__})")
    if not hasattr(processor, "handlers"):
        raise InputError("images need the model's processor (gemmaforge.load_processor), not its tokenizer")
    images = list(images or [])
    if text is not None and images:
        marker = processor.handler_for("image").marker
        if marker not in text:
            text = marker * len(images) + text
    batch = processor(text=text, messages=messages, images=images or None, add_generation_prompt=True)
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "token_types", "token_type_ids")}
    return batch["input_ids"][0].tolist(), media


def _generate_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, on_token, on_text,
                   return_stats, media=None):
    """``generate_ids`` with the tokenizer's stop ids, decoded (streamed through ``on_text`` if given)."""
    stream = TextStream(tokenizer, on_text)

    def step(i):
        if on_token is not None:
            on_token(i)
        stream.push(i)

    stats = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop_ids=stop_ids_of(model, tokenizer), on_token=step,
                         media=media)
    text = stream.finish()
    return (text, stats) if return_stats else text
