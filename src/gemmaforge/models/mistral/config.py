"""Mistral text decoder config (``MistralConfig``) and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError
from ..common.config import FULL, SLIDING, RopeSpec


@dataclass
class MistralConfig:
    """Mistral text decoder (``MistralForCausalLM``): Llama-style, optional sliding window on every layer."""

    vocab_size: int = 32_000
    hidden_size: int = 4096
    intermediate_size: int = 14_336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    sliding_window: int | None = None
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    hidden_activation: str = "silu"
    final_logit_softcapping = None

    model_type = "mistral"
    architecture = "MistralForCausalLM"

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def layer_types(self) -> list[str]:
        return [SLIDING if self.sliding_window else FULL] * self.num_hidden_layers

    @property
    def rope(self) -> dict[str, RopeSpec]:
        spec = RopeSpec(theta=self.rope_theta)
        return {FULL: spec, SLIDING: spec}

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window

    def to_hf(self) -> dict:
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "hidden_act": self.hidden_activation, "attention_dropout": 0.0, "dtype": "float32",
        }

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "MistralConfig":
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Mistral uses silu)")
        rp = d.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ConfigError(f"{where}: rope scaling is not supported for Mistral")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            eos = d.get("eos_token_id", 2)
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or hidden // heads), sliding_window=d.get("sliding_window"),
                max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rp.get("rope_theta", d.get("rope_theta", 10_000.0))),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), pad_token_id=d.get("pad_token_id"),
                bos_token_id=int(d.get("bos_token_id", 1)),
                eos_token_id=list(eos) if isinstance(eos, list) else [int(eos)],
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None


PRESETS: dict[str, dict] = {
    "mistral-7b-v0.1": dict(sliding_window=4096, rope_theta=10_000.0, max_position_embeddings=32_768),
    "mistral-tiny": dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, sliding_window=None, max_position_embeddings=1024, rope_theta=10_000.0),
}
