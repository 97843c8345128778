"""The HF ``tokenizers`` JSON of a Gemma GGUF's vocabulary (llama.cpp's SentencePiece metadata)."""

from __future__ import annotations

import contextlib
import gc
import json
import os

import tokenizers

from ...errors import CheckpointError
from ...data.tokenizer import Tokenizer
from .reader import GGUFFile, read_gguf

# -- tokenizer ---------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4
_SPACE = "\u2581"


def _respell(token: str) -> str:
    # Gemma GGUFs store runs of 2+ spaces as real spaces; the HF tokenizer spells them with "▁".
    return _SPACE * len(token) if " " in token and not token.strip() else token


def _merges_from_vocab(tokens: list[str], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges implied by a Gemma vocabulary: every split of a token into two vocab pieces,
    ranked by the token's position in the file, then longer left piece first.

    This is the order transformers' GGUF converter gives (``generate_merges`` scored by -index).
    """
    merges: list[list[str]] = []
    append = merges.append
    seen = set()
    order = []  # unique spellings in first-appearance order; a repeated one ranks by its last index
    for t in tokens:
        if t not in seen:
            seen.add(t)
            order.append(t)
    order.sort(key=vocab.__getitem__)
    with _no_gc():  # ~half a million small lists: the cyclic GC would rescan them over and over
        for t in order:
            for i in range(len(t) - 1, 0, -1):
                left = t[:i]
                if left in vocab:
                    right = t[i:]
                    if right in vocab:
                        append([left, right])
    return merges


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _added(token_id: int, content: str, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict:
    def tok(name, type_id):
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def seq(name, type_id):
        return {"Sequence": {"id": name, "type_id": type_id}}

    single = ([tok(bos[0], 0)] if bos else []) + [seq("A", 0)] + ([tok(eos[0], 0)] if eos else [])
    pair = single + ([tok(bos[0], 1)] if bos else []) + [seq("B", 1)] + ([tok(eos[0], 1)] if eos else [])
    special = {}
    for t in (bos, eos):
        if t:
            special[t[0]] = {"id": t[0], "ids": [t[1]], "tokens": [t[0]]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def gguf_tokenizer_json(f: GGUFFile) -> dict:
    """The HF ``tokenizers`` JSON (as a dict) of a Gemma GGUF's vocabulary.

    Mirrors what transformers builds for a gemma/gemma2/gemma3 GGUF with a ``llama`` (sentencepiece)
    vocabulary: a byte-fallback BPE whose merges are recovered from the vocabulary order, a
    " " -> "▁" normalizer, a split on spaces, control tokens as special added tokens, user-defined
    tokens as plain added tokens, and BOS/EOS added per ``tokenizer.ggml.add_{bos,eos}_token``.
    """
    with _no_gc():
        return _tokenizer_json(f)


def _tokenizer_json(f: GGUFFile) -> dict:
    md = f.metadata
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise CheckpointError(f"{f.path}: missing metadata key 'tokenizer.ggml.model' (no tokenizer in this GGUF)")
    if model != "llama" or f.architecture not in ("gemma", "gemma2", "gemma3"):
        raise CheckpointError(
            f"{f.path}: tokenizer {model!r} for architecture {f.architecture!r} is not supported "
            "(expected a Gemma sentencepiece vocabulary, tokenizer.ggml.model = 'llama')"
        )
    raw_tokens = f.require("tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(raw_tokens)
    if len(types) != len(raw_tokens):
        raise CheckpointError(
            f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(raw_tokens)} tokens"
        )
    tokens = [_respell(t) for t in raw_tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_vocab(tokens, vocab)

    def tok_of(key, default=None):
        i = md.get(key)
        if i is None or not (0 <= int(i) < len(raw_tokens)):
            return default
        return raw_tokens[int(i)]

    unk = tok_of("tokenizer.ggml.unknown_token_id", "<unk>")
    named = [tok_of(k) for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")]
    named.append("<mask>")  # GemmaTokenizer's default mask token

    added: dict[int, dict] = {}
    for i, (t, ty) in enumerate(zip(raw_tokens, types)):
        if ty == _CONTROL:
            added[i] = _added(i, t, True)
    for t, ty in zip(raw_tokens, types):
        if ty == _USER_DEFINED and t in vocab and vocab[t] not in added:
            added[vocab[t]] = _added(vocab[t], t, False)
    # bos/eos/unk/pad/mask that are not added tokens yet become special added tokens
    present = {a["content"] for a in added.values()}
    for t in named:
        if t is not None and t in vocab and t not in present:
            added[vocab[t]] = _added(vocab[t], t, True)
            present.add(t)

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    bos_id, eos_id = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
    bos = (raw_tokens[bos_id], int(bos_id)) if add_bos and bos_id is not None else None
    eos = (raw_tokens[eos_id], int(eos_id)) if add_eos and eos_id is not None else None

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added[k] for k in sorted(added)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": _template_processor(bos, eos),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer described by a Gemma GGUF file's metadata, its special tokens named."""
    f = read_gguf(path)
    spec = gguf_tokenizer_json(f)
    tokens = f.metadata["tokenizer.ggml.tokens"]

    def named(key):
        i = f.metadata.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return Tokenizer(
        tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)),
        bos_token=named("tokenizer.ggml.bos_token_id"),
        eos_token=named("tokenizer.ggml.eos_token_id"),
        pad_token=named("tokenizer.ggml.padding_token_id"),
        unk_token=named("tokenizer.ggml.unknown_token_id"),
        where=str(path),
    )
