"""GGUF export: a gemmaforge model and its tokenizer -> one llama.cpp GGUF file.

    from gemmaforge.formats.gguf.writer import export_gguf
    export_gguf(model, tokenizer, "model-f16.gguf", dtype="f16")     # f32 | f16 | bf16 | q8_0

Everything GGUF-specific comes from the ``gguf`` package (llama.cpp's gguf-py): the file writer
(``GGUFWriter``, streamed one tensor at a time), the HF -> GGUF tensor names (``TensorNameMap``),
the metadata keys (``add_*``), the F16/BF16/Q8_0 encoders (``gguf.quants``) and the size label.
What this module decides is what llama.cpp's own ``convert_hf_to_gguf.py`` decides for the same
model, so the file loads in llama.cpp and reads back through :func:`gemmaforge.formats.gguf.load_gguf`:

- **Gemma 3** -> architecture ``gemma3`` (``Gemma3Model``): every ``*norm.weight`` stored as
  ``1 + w``; no q/k permutation; the tied head is not written; ``rope.freq_base`` (global layers),
  ``rope.freq_base_swa`` (sliding layers), linear rope scaling (4B+), ``attention.sliding_window``,
  ``final_logit_softcapping`` when set. A layer pattern other than llama.cpp's default (every 6th
  layer global) is written as the per-layer ``attention.sliding_window_pattern`` array that
  llama.cpp reads; a ``query_pre_attn_scalar`` llama.cpp would not infer is written as
  ``attention.scale`` (gemmaforge reads it; llama.cpp's gemma3 ignores it: a warning says so).
- **Mistral** -> architecture ``llama`` (``LlamaModel``, the class llama.cpp's converter uses for
  ``MistralForCausalLM``): q_proj/k_proj rows permuted into llama.cpp's rotary layout,
  ``vocab_size`` and ``rope.dimension_count`` written. A sliding window (Mistral 7B v0.1) is kept
  as ``llama.attention.sliding_window``, which llama.cpp ignores (as its converter does).
- **Gemma 4** is refused with one line: llama.cpp has a ``gemma4`` architecture, but its
  per-layer embeddings, KV sharing and ``gemma4`` tokenizer are not written here.

Tensor types follow the converter: 1-D tensors and norms are F32, the rest take ``dtype``; a row
that Q8_0's 32-element blocks do not divide falls back to F16 (the converter's ``QuantError`` path).

The tokenizer is written as llama.cpp's sentencepiece vocabulary (``tokenizer.ggml.model =
llama``), as ``_create_vocab_sentencepiece`` + ``SpecialVocab`` write it: tokens by id, padded with
``[PADn]`` (UNUSED) up to the embedding's rows; special added tokens (and the ones llama.cpp's
``does_token_look_special`` names) CONTROL, other added tokens USER_DEFINED with ``▁`` spelled as a
space, ``<0xXX>`` BYTE (score 0), everything else NORMAL. A ``tokenizer.json`` carries no
sentencepiece scores, so NORMAL tokens get ``-rank`` (their order, which is all llama.cpp's
tokenizer compares); CONTROL / USER_DEFINED get -1000 as in the converter. For Gemma, whitespace
runs (``▁▁``...) are the user-defined pieces of Gemma's sentencepiece model (as the GGUF reader
respells them). BOS/EOS/UNK/PAD ids, ``add_bos``/``add_eos``/``add_sep``, ``add_space_prefix``
and the chat template complete it.

Round trip through gemmaforge's reader: f32 is exact for every weight except where ``(1 + w) - 1``
is not ``w`` in float32 (Gemma's norm scales, as llama.cpp stores them); f16/bf16/q8_0 are exact
up to the format's rounding of each weight.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...data.tokenizer import GEMMA_CHAT_TEMPLATE
from ...errors import CheckpointError, ConfigError

__all__ = ["DTYPES", "REQUIRED_KEYS", "GGUFExportWarning", "check_dtype", "check_output_path", "export_gguf",
           "gguf_architecture", "source_chat_template"]

# --dtype -> (gguf.LlamaFileType member, gguf.GGMLQuantizationType member of the big tensors)
DTYPES: dict[str, tuple[str, str]] = {
    "f32": ("ALL_F32", "F32"),
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
}

# gemmaforge model_type -> llama.cpp architecture (None: known, not exported)
_ARCH = {"gemma3_text": "gemma3", "mistral": "llama", "gemma4_text": None}

# The keys llama.cpp needs (or its converter always writes) for each architecture.
_TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
]
REQUIRED_KEYS: dict[str, list[str]] = {
    "gemma3": [
        "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version",
        "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count", "gemma3.feed_forward_length",
        "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
        "gemma3.attention.value_length", "gemma3.attention.layer_norm_rms_epsilon", "gemma3.rope.freq_base",
        "gemma3.rope.freq_base_swa", "gemma3.attention.sliding_window",
        *_TOKENIZER_KEYS, "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
    ],
    "llama": [
        "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version",
        "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
        "llama.attention.value_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
        "llama.vocab_size", "llama.rope.dimension_count",
        *_TOKENIZER_KEYS,
    ],
}

_SPACE = "\u2581"
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE_T = 1, 3, 4, 5, 6


class GGUFExportWarning(UserWarning):
    """Something the file holds that llama.cpp will read differently from gemmaforge."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF export needs the gguf package (pip install 'gemmaforge[gguf]')") from None
    return gguf


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def check_dtype(dtype: str) -> str:
    """``dtype`` as a key of :data:`DTYPES` (``f32``, ``f16``, ``bf16``, ``q8_0``), or a one-line error."""
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return key


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a file gemmaforge can write: its folder exists and is writable, it is no folder."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory (--out names the .gguf file to write)")
    if not parent.exists():
        raise CheckpointError(f"{p}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise CheckpointError(f"{p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CheckpointError(f"{p}: not writable (permission denied)")
    return p


def gguf_architecture(model) -> str:
    """llama.cpp's architecture for ``model`` (``gemma3``, ``llama``), or a one-line refusal."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in _ARCH:
        raise ConfigError(f"model_type {mt!r}: no llama.cpp GGUF mapping (exportable: Gemma 3, Mistral)")
    arch = _ARCH[mt]
    if arch is None:
        raise ConfigError(
            f"model_type {mt!r}: GGUF export of Gemma 4 is not supported (llama.cpp's gemma4 architecture needs "
            "per-layer embeddings, KV sharing and its gemma4 tokenizer, which this exporter does not write); "
            "exportable: Gemma 3, Mistral"
        )
    return arch


def source_chat_template(src: str | os.PathLike) -> str | None:
    """The chat template an HF dir (``tokenizer_config.json`` / ``chat_template.jinja`` /
    ``chat_template.json``) or a .gguf file (``tokenizer.chat_template``) ships, if any."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        from .reader import read_gguf

        t = read_gguf(p).metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) else None
    if not p.is_dir():
        return None
    with contextlib.suppress(OSError, ValueError):
        t = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, str):
            return t
    with contextlib.suppress(OSError):
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    with contextlib.suppress(OSError, ValueError):
        t = json.loads((p / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, str):
            return t
    return None


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------


def _model_state(model) -> dict[str, tuple[torch.Tensor, Callable[[], torch.Tensor]]]:
    """HF name -> (the stored tensor, what to write: the tensor, or for a LoRA-wrapped weight
    ``W + s * B @ A``, computed when written), the tied head and non-persistent buffers left out."""
    from ...adapters.lora import lora_modules

    lora = lora_modules(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()} - set(state)
    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k or k in buffers or (tied and k == "lm_head.weight"):
            continue
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and mod in lora:
            out[k] = (v, lora[mod].effective_weight)
        else:
            out[k] = (v, lambda v=v: v)
    return out


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: each head's rows (two rotary halves) interleaved pairwise."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Plan:
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]


def _plan_tensors(gguf, arch: str, model, qtype_name: str) -> list[_Plan]:
    cfg = model.config
    state = _model_state(model)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    Q = gguf.GGMLQuantizationType
    big = getattr(Q, qtype_name)
    block = gguf.GGML_QUANT_SIZES[big][0]
    plans = []
    for key, (t, value) in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}; GGUF export writes float weights only")
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"tensor {key!r} has no GGUF name in llama.cpp's {arch!r} architecture")

        def load(value=value, key=key):
            x = value().detach().to("cpu", torch.float32)
            if arch == "gemma3" and key.endswith("norm.weight"):
                x = x + 1.0  # Gemma3RMSNorm scales by (1 + w); llama.cpp stores 1 + w
            elif arch == "llama" and key.endswith("q_proj.weight"):
                x = _llama_permute(x, cfg.num_attention_heads)
            elif arch == "llama" and key.endswith("k_proj.weight"):
                x = _llama_permute(x, cfg.num_key_value_heads)
            return x

        shape = tuple(t.shape)
        if len(shape) <= 1 or name.endswith("_norm.weight"):
            qtype = Q.F32
        elif shape[-1] % block:
            qtype = Q.F16  # the converter's fallback when a row does not fill whole blocks
        else:
            qtype = big
        plans.append(_Plan(name, shape, qtype, load))
    return plans


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def _encode(gguf, x: torch.Tensor, qtype):
    return gguf.quants.quantize(x.contiguous().numpy(), qtype)


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------


def _note(msg: str) -> None:
    warnings.warn(msg, GGUFExportWarning, stacklevel=3)


def _gemma3_params(gguf, gw, cfg) -> None:
    from ...models.common.config import FULL, SLIDING

    n = cfg.num_hidden_layers
    gw.add_context_length(int(cfg.max_position_embeddings))
    gw.add_embedding_length(cfg.hidden_size)
    gw.add_block_count(n)
    gw.add_feed_forward_length(cfg.intermediate_size)
    gw.add_head_count(cfg.num_attention_heads)
    gw.add_head_count_kv(cfg.num_key_value_heads)
    gw.add_key_length(cfg.head_dim)
    gw.add_value_length(cfg.head_dim)
    gw.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    full, local = cfg.rope[FULL], cfg.rope[SLIDING]
    if local.rope_type != "default" or local.factor != 1.0 or local.partial_rotary_factor != 1.0:
        raise ConfigError(f"rope of sliding layers {local.rope_type!r} (factor {local.factor}): "
                          "llama.cpp's gemma3 has no rope scaling for sliding layers")
    if full.partial_rotary_factor != 1.0 or full.rope_type not in ("default", "linear"):
        raise ConfigError(f"rope_type {full.rope_type!r} of full-attention layers: no llama.cpp gemma3 mapping "
                          "(supported: default, linear)")
    gw.add_rope_freq_base(float(full.theta))
    if full.rope_type == "linear" and full.factor != 1.0:
        gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        gw.add_rope_scaling_factor(float(full.factor))
    gw.add_rope_freq_base_swa(float(local.theta))
    if cfg.final_logit_softcapping:
        gw.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if cfg.attn_logit_softcapping:
        gw.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        _note(f"attn_logit_softcapping={cfg.attn_logit_softcapping}: written as gemma3.attn_logit_softcapping, "
              "which llama.cpp's gemma3 ignores")
    swa = [t == SLIDING for t in cfg.layer_types]
    gw.add_sliding_window(int(cfg.sliding_window or 0) if any(swa) else 0)
    if swa != [i % 6 < 5 for i in range(n)]:  # llama.cpp's default for gemma3: every 6th layer global
        gw.add_sliding_window_pattern(swa)
    # llama.cpp scales queries by 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads)); say so when the model differs
    implied = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim
    if float(cfg.query_pre_attn_scalar) != float(implied):
        gw.add_attention_scale(float(cfg.query_pre_attn_scalar) ** -0.5)
        _note(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} differs from what llama.cpp's gemma3 assumes "
              f"({implied}): written as gemma3.attention.scale, which gemmaforge reads and llama.cpp ignores")


def _llama_params(gguf, gw, cfg) -> None:
    gw.add_block_count(cfg.num_hidden_layers)
    gw.add_context_length(int(cfg.max_position_embeddings))
    gw.add_embedding_length(cfg.hidden_size)
    gw.add_feed_forward_length(cfg.intermediate_size)
    gw.add_head_count(cfg.num_attention_heads)
    gw.add_head_count_kv(cfg.num_key_value_heads)
    gw.add_rope_freq_base(float(cfg.rope_theta))
    gw.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    gw.add_key_length(cfg.head_dim)
    gw.add_value_length(cfg.head_dim)
    gw.add_vocab_size(cfg.vocab_size)
    gw.add_rope_dimension_count(cfg.head_dim)
    if cfg.sliding_window:
        gw.add_sliding_window(int(cfg.sliding_window))
        _note(f"sliding_window={cfg.sliding_window}: written as llama.attention.sliding_window, which llama.cpp's "
              "llama architecture ignores (it attends to the whole context)")


def _look_special(t: str) -> bool:
    """llama.cpp's ``TextModel.does_token_look_special``."""
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<\uff5c") and t.endswith("\uff5c>")) or (t.startswith("<unused") and t.endswith(">")))


def _backend_json(obj) -> dict:
    if obj is None:
        return {}
    try:
        return json.loads(obj.__getstate__())
    except Exception:
        return {}


def _adds_space_prefix(backend) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (llama's sentencepiece ``add_dummy_prefix``)."""
    def walk(d) -> bool:
        if isinstance(d, list):
            return any(walk(x) for x in d)
        if not isinstance(d, dict):
            return False
        if d.get("type") == "Prepend" and d.get("prepend") == _SPACE:
            return True
        if d.get("type") == "Metaspace" and (d.get("prepend_scheme") in ("first", "always") or d.get("add_prefix_space")):
            return True
        return any(walk(v) for v in d.values() if isinstance(v, (list, dict)))

    return walk(_backend_json(backend.normalizer)) or walk(_backend_json(backend.pre_tokenizer))


def _vocab(tokenizer, n_rows: int, gemma: bool) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types: llama.cpp's sentencepiece vocabulary of ``tokenizer``."""
    import tokenizers

    backend = tokenizer.backend
    model = backend.model
    if not (isinstance(model, tokenizers.models.BPE) and getattr(model, "byte_fallback", False)):
        raise ConfigError(
            f"tokenizer model {type(model).__name__} (byte_fallback={getattr(model, 'byte_fallback', None)}): GGUF export "
            "writes sentencepiece-style vocabularies (BPE with byte fallback, as Gemma's and Mistral's)"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    n = max(vocab.values()) + 1 if vocab else 0
    if n > n_rows:
        raise CheckpointError(f"tokenizer has {n} tokens but the model's embedding only {n_rows} rows")
    by_id: list[str | None] = [None] * n_rows
    for t, i in vocab.items():
        by_id[i] = t
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    rank = 0
    for i, t in enumerate(by_id):
        if i in added:
            a = added[i]
            t = a.content
            if a.special or _look_special(t):
                ty = _CONTROL
            else:
                ty, t = _USER_DEFINED, t.replace(_SPACE, " ")  # the converter's "pre-normalize user-defined spaces"
            sc = -1000.0
        elif t is None:
            t, ty, sc = f"[PAD{i}]", _UNUSED, -1000.0
        elif _BYTE.fullmatch(t):
            ty, sc = _BYTE_T, 0.0
        elif gemma and len(t) > 1 and not t.strip(_SPACE):
            t, ty, sc = " " * len(t), _USER_DEFINED, -1000.0  # Gemma's whitespace-run pieces
        else:
            ty, sc = _NORMAL, -float(rank)
            rank += 1
        tokens.append(t)
        scores.append(sc)
        types.append(ty)
    return tokens, scores, types


def _template_specials(backend) -> tuple[str | None, str | None]:
    pp = _backend_json(backend.post_processor)
    single = pp.get("single") if pp.get("type") == "TemplateProcessing" else None
    if not single:
        return None, None
    first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    return first, last


def _tokenizer_metadata(gw, tokenizer, n_rows: int, arch: str, chat_template: str | None) -> None:
    gemma = arch == "gemma3"
    tokens, scores, types = _vocab(tokenizer, n_rows, gemma)
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(types)
    for add, tid in ((gw.add_bos_token_id, tokenizer.bos_id), (gw.add_eos_token_id, tokenizer.eos_id),
                     (gw.add_unk_token_id, tokenizer.unk_id), (gw.add_pad_token_id, tokenizer.pad_id)):
        if tid is not None:
            add(int(tid))
    _, last = _template_specials(tokenizer.backend)
    gw.add_add_bos_token(True)  # gemmaforge's encode (and llama.cpp's converter for both families) add BOS
    gw.add_add_sep_token(False)
    gw.add_add_eos_token(last is not None and last == tokenizer.eos_token)
    gw.add_add_space_prefix(False if gemma else _adds_space_prefix(tokenizer.backend))
    template = chat_template if chat_template is not None else (GEMMA_CHAT_TEMPLATE if gemma else None)
    if template:
        gw.add_chat_template(template)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def export_gguf(model, tokenizer, path: str | os.PathLike, dtype: str = "f16", *, name: str | None = None,
                chat_template: str | None = None) -> Path:
    """Write ``model`` (LoRA adapters folded in) and ``tokenizer`` as a llama.cpp GGUF file.

    ``dtype``: ``f32``, ``f16`` (llama.cpp's default), ``bf16`` or ``q8_0`` for the matrices (norms
    and 1-D tensors stay F32). ``name``: ``general.name``. ``chat_template``: ``tokenizer.chat_template``
    (default: gemmaforge's Gemma template for Gemma, none for Mistral). The file appears at ``path``
    only once complete (written next to it, then renamed). Returns ``path``.
    """
    ftype_name, qtype_name = DTYPES[check_dtype(dtype)]
    out = check_output_path(path)
    arch = gguf_architecture(model)
    if tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from the file)")
    gguf = _gguf()
    cfg = model.config
    plans = _plan_tensors(gguf, arch, model, qtype_name)
    emb = next((p for p in plans if p.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError("model has no token embedding (model.embed_tokens.weight)")

    # a temporary name next to ``out`` (created by the writer, so with the user's default permissions)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    gw = gguf.GGUFWriter(tmp, arch)
    try:
        n_params = sum(math.prod(p.shape) for p in plans)
        gw.add_type(gguf.GGUFType.MODEL)
        gw.add_name(name or type(model).__name__)
        gw.add_size_label(gguf.size_label(n_params, 0, 0, 0))
        (_gemma3_params if arch == "gemma3" else _llama_params)(gguf, gw, cfg)
        gw.add_file_type(getattr(gguf.LlamaFileType, ftype_name))
        gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(gw, tokenizer, emb.shape[0], arch, chat_template)
        for p in plans:
            gw.add_tensor_info(p.name, p.shape, np.float32, _nbytes(gguf, p.shape, p.qtype), raw_dtype=p.qtype)
        gw.write_header_to_file()
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()
        for p in plans:
            with torch.no_grad():
                gw.write_tensor_data(_encode(gguf, p.load(), p.qtype))
        gw.close()
        os.replace(tmp, out)
    except BaseException as e:
        gw.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # unwritable folder, full disk, ...: one line naming the file
            raise CheckpointError(f"{out}: cannot write ({e.strerror or e})") from None
        raise
    return out
