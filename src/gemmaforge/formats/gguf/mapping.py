"""Gemma 3 GGUF -> transformers ``Gemma3ForCausalLM`` names, config and state dict (and, in the
llama section at the end, a llama GGUF -> ``MistralForCausalLM``).

Conversion follows what transformers 5.23 does with a gemma3 GGUF: tensors are renamed and every
``*norm.weight`` gets 1 subtracted (llama.cpp stores Gemma's RMSNorm scale as ``1 + w``); there is
no q/k permutation for Gemma.

    hf_config, state_dict, tokenizer_json = load_gguf("gemma-3-270m-Q4_K_M.gguf")
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ...errors import CheckpointError
from .reader import GGUFFile, read_gguf
from .tokenizer import gguf_tokenizer_json

# ----------------------------------------------------------------------------------------------
# Gemma 3: names, config, tokenizer
# ----------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_hf_name(name: str) -> str | None:
    """The transformers Gemma3ForCausalLM key of a gemma3 GGUF tensor (None: not a model weight)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _is_gemma_norm(gguf_name: str) -> bool:
    # llama.cpp's converter stores Gemma RMSNorm weights as (1 + w); transformers subtracts 1 from
    # every tensor whose name contains "norm.weight".
    return "norm.weight" in gguf_name


def _layer_types(f: GGUFFile, n_layers: int) -> list[str]:
    """Which layers attend globally. llama.cpp's gemma3 uses a period of 6 (every 6th layer global)."""
    pattern = f.metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per-layer flags, True = sliding window (llama.cpp's swa_layers)
        if len(pattern) != n_layers:
            raise CheckpointError(
                f"{f.path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers"
            )
        return ["sliding_attention" if bool(x) else "full_attention" for x in pattern]
    period = 6 if pattern is None else int(pattern)
    # llama.cpp set_swa_pattern(n): layer il is SWA iff n == 0 or il % n < n - 1
    return [
        "sliding_attention" if (period == 0 or i % period < period - 1) else "full_attention" for i in range(n_layers)
    ]


def _rope_parameters(f: GGUFFile) -> dict:
    md = f.metadata
    base = float(md.get("gemma3.rope.freq_base", 1_000_000.0))
    local_base = float(md.get("gemma3.rope.freq_base_swa", 10_000.0))
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    stype = md.get("gemma3.rope.scaling.type")
    factor = md.get("gemma3.rope.scaling.factor")
    if stype not in (None, "none") and factor not in (None, 0.0, 1.0):
        if stype == "linear":
            full = {"rope_type": "linear", "factor": float(factor), "rope_theta": base}
        elif stype == "yarn":
            full = {"rope_type": "yarn", "factor": float(factor), "rope_theta": base}
            orig = md.get("gemma3.rope.scaling.original_context_length")
            if orig is not None:
                full["original_max_position_embeddings"] = int(orig)
        else:
            raise CheckpointError(f"{f.path}: unsupported rope scaling type {stype!r}")
    return {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}


def gguf_to_hf_config(f: GGUFFile) -> dict:
    """A transformers config.json dict from a GGUF's metadata: ``Gemma3TextConfig`` for gemma3,
    ``MistralConfig`` for llama (see the llama section below)."""
    arch = f.architecture
    if arch == "llama":
        return _llama_hf_config(f)
    if arch != "gemma3":
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported (expected 'gemma3' or 'llama')")
    md = f.metadata
    req = f.require
    hidden = int(req("gemma3.embedding_length"))
    n_layers = int(req("gemma3.block_count"))
    n_heads = int(req("gemma3.attention.head_count"))
    n_kv = md.get("gemma3.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        n_kv = max(n_kv)
    head_dim = int(md.get("gemma3.attention.key_length", hidden // n_heads))
    if "gemma3.vocab_size" in md:
        vocab = int(md["gemma3.vocab_size"])
    elif "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    else:
        vocab = f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else None
        if vocab is None:
            raise CheckpointError(f"{f.path}: cannot tell the vocabulary size (no tokens, no token_embd.weight)")
    scale = md.get("gemma3.attention.scale")
    if scale:
        qpas = float(1.0 / (float(scale) ** 2))
        qpas = int(round(qpas)) if abs(qpas - round(qpas)) < 1e-3 else qpas
    elif n_layers == 62:
        # llama.cpp hard-codes 1/sqrt(hidden/heads) for Gemma 3 27B (62 layers); HF's config has 168
        qpas = hidden // n_heads
    else:
        qpas = head_dim

    def soft(key):
        v = md.get(key)
        return float(v) if v else None

    ctx = int(md.get("gemma3.context_length", 131072))
    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(req("gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(md.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(md.get("gemma3.attention.sliding_window", 4096)),
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "layer_types": _layer_types(f, n_layers),
        "rope_parameters": _rope_parameters(f),
        "query_pre_attn_scalar": qpas,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id", 0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "final_logit_softcapping": soft("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": soft("gemma3.attn_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return cfg


def _hf_state_dict(f: GGUFFile, cfg: dict) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, info in f.tensors.items():
        key = gguf_to_hf_name(name)
        if key is None:
            continue  # e.g. rope_freqs, vision tower: not part of Gemma3ForCausalLM
        w = f.tensor(name)
        if _is_gemma_norm(name):
            w = w - 1.0
        sd[key] = w
    n_layers = cfg["num_hidden_layers"]
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    expected += [f"model.layers.{i}.{k}" for i in range(n_layers) for k in _BLOCK_NAMES.values()]
    if not cfg["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for key in expected:
        if key not in sd:
            gname = next((g for g in list(_GLOBAL_NAMES) if _GLOBAL_NAMES[g] == key), None)
            if gname is None:
                m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
                gname = f"blk.{m.group(1)}." + next(g for g, h in _BLOCK_NAMES.items() if h == m.group(2))
            raise CheckpointError(f"{f.path}: missing tensor {gname!r} (needed for {key})")
    # shapes
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    per_layer = {
        "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (cfg["intermediate_size"], h),
        "mlp.up_proj.weight": (cfg["intermediate_size"], h),
        "mlp.down_proj.weight": (h, cfg["intermediate_size"]),
    }
    for i in range(n_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    for key, s in shapes.items():
        if tuple(sd[key].shape) != s:
            raise CheckpointError(f"{f.path}: tensor for {key} has shape {tuple(sd[key].shape)}, config implies {s}")
    return sd


# -- entry points ------------------------------------------------------------------------------


def load_gguf_tokenizer(path: str | os.PathLike) -> dict:
    """The HF ``tokenizers`` JSON dict of a Gemma (or llama) GGUF's vocabulary (no tensor is read)."""
    f = read_gguf(path)
    return _llama_tokenizer_json(f) if f.metadata.get("general.architecture") == "llama" else gguf_tokenizer_json(f)


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """``(hf_config, state_dict, tokenizer_json)`` of a Gemma 3 GGUF file.

    ``hf_config``: a transformers ``Gemma3TextConfig`` config.json dict. ``state_dict``: float32
    tensors under ``Gemma3ForCausalLM`` names and shapes, equal to what transformers loads from
    the same file (``lm_head.weight`` only when the file has an untied ``output.weight``).
    ``tokenizer_json``: an HF ``tokenizers`` JSON dict (see :func:`gguf_tokenizer_json`).
    """
    f = read_gguf(path)
    cfg = gguf_to_hf_config(f)
    if f.architecture == "llama":
        return cfg, _llama_state_dict(f, cfg), _llama_tokenizer_json(f)
    sd = _hf_state_dict(f, cfg)
    tok = gguf_tokenizer_json(f)
    return cfg, sd, tok


# ----------------------------------------------------------------------------------------------
# llama (what llama.cpp's converter writes for MistralForCausalLM / LlamaForCausalLM):
# names, config, q/k un-permutation, sentencepiece tokenizer -> transformers MistralForCausalLM
# ----------------------------------------------------------------------------------------------

_LLAMA_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _llama_require(f: GGUFFile, key: str):
    if key not in f.metadata:
        raise CheckpointError(f"{f.path}: GGUF architecture 'llama': missing metadata key {key!r}")
    return f.metadata[key]


def _llama_hf_config(f: GGUFFile) -> dict:
    """A transformers ``MistralConfig`` config.json dict from a llama GGUF's metadata."""
    md = f.metadata
    hidden = int(_llama_require(f, "llama.embedding_length"))
    n_layers = int(_llama_require(f, "llama.block_count"))
    n_heads = int(_llama_require(f, "llama.attention.head_count"))
    n_kv = md.get("llama.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list) or isinstance(n_heads, list):
        raise CheckpointError(f"{f.path}: GGUF architecture 'llama': per-layer head counts are not supported")
    head_dim = int(md.get("llama.attention.key_length", hidden // n_heads))
    rot = int(md.get("llama.rope.dimension_count", head_dim))
    unsupported = []
    if rot != head_dim:
        unsupported.append(f"llama.rope.dimension_count={rot} (partial rotary; head_dim {head_dim})")
    if md.get("llama.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in f.tensors:
        unsupported.append("rope scaling")
    if md.get("llama.expert_count"):
        unsupported.append(f"llama.expert_count={md['llama.expert_count']} (mixture of experts)")
    if unsupported:
        raise CheckpointError(f"{f.path}: GGUF architecture 'llama': {'; '.join(unsupported)} is not supported")
    if "llama.vocab_size" in md:
        vocab = int(md["llama.vocab_size"])
    elif "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    elif "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].shape[0]
    else:
        raise CheckpointError(f"{f.path}: GGUF architecture 'llama': cannot tell the vocabulary size")
    window = md.get("llama.attention.sliding_window")
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_llama_require(f, "llama.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "sliding_window": int(window) if window else None,
        "max_position_embeddings": int(md.get("llama.context_length", 4096)),
        "rms_norm_eps": float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(md.get("llama.rope.freq_base", 10_000.0))},
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }


def _llama_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` of q_proj / k_proj rows (its rotary layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama_state_dict(f: GGUFFile, cfg: dict) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name in f.tensors:
        m = _BLK.fullmatch(name)
        if name in _LLAMA_GLOBAL_NAMES:
            key = _LLAMA_GLOBAL_NAMES[name]
        elif m and m.group(2) in _LLAMA_BLOCK_NAMES:
            key = f"model.layers.{m.group(1)}.{_LLAMA_BLOCK_NAMES[m.group(2)]}"
        else:
            raise CheckpointError(f"{f.path}: GGUF architecture 'llama': tensor {name!r} is not supported")
        w = f.tensor(name)
        if name.endswith("attn_q.weight"):
            w = _llama_unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = _llama_unpermute(w, cfg["num_key_value_heads"])
        sd[key] = w
    h, hd, ff = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    per_layer = {
        "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * hd),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }
    for i in range(cfg["num_hidden_layers"]):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    for key, s in shapes.items():
        if key not in sd:
            raise CheckpointError(f"{f.path}: GGUF architecture 'llama': missing the tensor for {key}")
        if tuple(sd[key].shape) != s:
            raise CheckpointError(f"{f.path}: tensor for {key} has shape {tuple(sd[key].shape)}, config implies {s}")
    return sd


class _SentencePieceView:
    """A llama GGUF's metadata as the sentencepiece-vocabulary builder of ``tokenizer.py`` reads it
    (that builder checks for a Gemma architecture; the vocabulary format is the same)."""

    architecture = "gemma"

    def __init__(self, f: GGUFFile):
        self.path, self.metadata = f.path, f.metadata

    def require(self, key: str):
        return GGUFFile.require(self, key)  # type: ignore[arg-type]


def _llama_tokenizer_json(f: GGUFFile) -> dict:
    """The HF ``tokenizers`` JSON of a llama GGUF's sentencepiece vocabulary: Gemma's builder plus the
    dummy prefix (``tokenizer.ggml.add_space_prefix``, llama.cpp's default true) and its decoder strip."""
    model = f.metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise CheckpointError(f"{f.path}: tokenizer {model!r} for architecture 'llama' is not supported "
                              "(expected a sentencepiece vocabulary, tokenizer.ggml.model = 'llama')")
    spec = gguf_tokenizer_json(_SentencePieceView(f))  # type: ignore[arg-type]
    if bool(f.metadata.get("tokenizer.ggml.add_space_prefix", True)):
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, spec["normalizer"]]}
        spec["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return spec
