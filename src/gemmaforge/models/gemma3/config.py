"""Gemma 3 text decoder config (``Gemma3TextConfig``; the text part of ``Gemma3Config``) and its presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import ConfigError
from ..common.config import FULL, SLIDING, RopeSpec, rope_from_hf


@dataclass
class Gemma3Config:
    """Gemma 3 text decoder (``Gemma3ForCausalLM`` / ``Gemma3TextConfig``)."""

    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    # scale = query_pre_attn_scalar ** -0.5 (27B: 168 with head_dim 128, not 1/sqrt(head_dim))
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 512
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    layer_types: list[str] = field(default_factory=list)
    rope: dict[str, RopeSpec] = field(default_factory=dict)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"

    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"

    def __post_init__(self):
        if not self.layer_types:
            # default Gemma 3 pattern: 5 sliding layers then 1 full (full at 5, 11, 17, ...)
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if not self.rope:
            self.rope = {FULL: RopeSpec(theta=1_000_000.0), SLIDING: RopeSpec(theta=10_000.0)}
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    def validate(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"layer_types: unknown layer type {t!r}")
            if t not in self.rope:
                raise ConfigError(f"rope_parameters: no entry for layer type {t!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a positive sliding_window")

    # ---- derived ----
    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    # ---- HF config.json ----
    def to_hf(self) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "layer_types": list(self.layer_types),
            "rope_parameters": {t: spec.to_hf() for t, spec in self.rope.items()},
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
            "hidden_activation": self.hidden_activation,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": False,
            "dtype": "float32",
        }

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Gemma3Config":
        d = dict(d)
        if d.get("model_type") == "gemma3" and "text_config" in d:  # multimodal wrapper
            d = {**d["text_config"], "model_type": "gemma3_text"}
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{where}: use_bidirectional_attention=true (embedding models) is not supported")
        if d.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not a Gemma 3 checkpoint")
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{where}: hidden_activation {act!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
        try:
            n_layers = int(d["num_hidden_layers"])
            layer_types = d.get("layer_types")
            if not layer_types:
                pattern = int(d.get("sliding_window_pattern", 6))
                layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
            rope = rope_from_hf(d, where, {FULL: 1_000_000.0, SLIDING: 10_000.0}, local_key="rope_local_base_freq")
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id", 1)
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or hidden // heads),
                query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
                sliding_window=d.get("sliding_window", 4096),
                max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                layer_types=list(layer_types),
                rope=rope,
                attn_logit_softcapping=d.get("attn_logit_softcapping"),
                final_logit_softcapping=d.get("final_logit_softcapping"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else 0),
                eos_token_id=list(eos) if isinstance(eos, list) else [int(eos)],
                bos_token_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 2),
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: bad value ({e})") from None


# --------------------------------------------------------------------------------------------
# presets: official sizes (architecture-reference table) and tiny debug configs for tests

def _g3(hidden, inter, layers, heads, kv, head_dim, qpas, window, max_pos, factor=1.0, vocab=262_144):
    rope = {
        FULL: RopeSpec(theta=1_000_000.0, rope_type="linear" if factor != 1.0 else "default", factor=factor),
        SLIDING: RopeSpec(theta=10_000.0),
    }
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas,
        sliding_window=window, max_position_embeddings=max_pos, rope=rope,
    )


PRESETS: dict[str, dict] = {
    "gemma-3-270m": _g3(640, 2048, 18, 4, 1, 256, 256, 512, 32_768),
    "gemma-3-1b": _g3(1152, 6912, 26, 4, 1, 256, 256, 512, 32_768),
    "gemma-3-4b": _g3(2560, 10240, 34, 8, 4, 256, 256, 1024, 131_072, factor=8.0, vocab=262_208),
    "gemma-3-12b": _g3(3840, 15360, 48, 16, 8, 256, 256, 1024, 131_072, factor=8.0, vocab=262_208),
    "gemma-3-27b": _g3(5376, 21504, 62, 32, 16, 128, 168, 1024, 131_072, factor=8.0, vocab=262_208),
    # tiny: exercises GQA, head_dim != hidden/heads, qpas != head_dim, both layer types, linear scaling
    "gemma-3-tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        max_position_embeddings=1024, layer_types=[SLIDING, FULL, SLIDING, FULL],
        rope={FULL: RopeSpec(theta=10_000.0, rope_type="linear", factor=4.0), SLIDING: RopeSpec(theta=1000.0)},
    ),
}
