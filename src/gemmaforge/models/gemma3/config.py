"""Gemma 3 configs and presets: the text decoder (``Gemma3TextConfig``), the SigLIP vision tower
(``SiglipVisionConfig``) and, with a ``vision_config``, the whole multimodal ``Gemma3Config``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ...errors import ConfigError
from ..common.config import FULL, SLIDING, RopeSpec, rope_from_hf


@dataclass
class SiglipVisionConfig:
    """Gemma 3's vision tower (transformers' ``SiglipVisionConfig``, no pooling head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    model_type = "siglip_vision_model"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size ({self.hidden_size}) is not a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size ({self.image_size}) is not a multiple of "
                              f"patch_size ({self.patch_size})")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ConfigError(f"vision_config: hidden_act {self.hidden_act!r} is not supported")

    def to_hf(self) -> dict:
        return {"model_type": self.model_type, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_channels": self.num_channels,
                "image_size": self.image_size, "patch_size": self.patch_size, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": self.hidden_act, "attention_dropout": 0.0, "vision_use_head": False}

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "SiglipVisionConfig":
        if d.get("vision_use_head"):
            raise ConfigError(f"{where}: vision_config.vision_use_head=true is not a Gemma 3 vision tower")
        # missing keys take transformers' SiglipVisionConfig defaults (not the Gemma 3 sizes)
        d = {**HF_SIGLIP_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        known = {k: d[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act")
                 if d.get(k) is not None}
        try:
            return cls(**known)
        except TypeError as e:
            raise ConfigError(f"{where}: vision_config: bad value ({e})") from None


HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
                          hidden_act="gelu_pytorch_tanh")
# transformers' Gemma3TextConfig defaults: the text_config of a released multimodal config.json names
# only what differs from them
HF_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                               sliding_window=4096, max_position_embeddings=131_072, rms_norm_eps=1e-6)


@dataclass
class Gemma3Config:
    """Gemma 3 text decoder (``Gemma3ForCausalLM`` / ``Gemma3TextConfig``); with a ``vision_config``
    the whole ``Gemma3ForConditionalGeneration`` (``Gemma3Config`` with its ``text_config``)."""

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
    # multimodal (None: text only)
    vision_config: SiglipVisionConfig | None = None
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999  # <start_of_image>
    eoi_token_id: int = 256_000  # <end_of_image>
    image_token_id: int = 262_144  # <image_soft_token>, the placeholder the image features replace

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
        if isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**self.vision_config)
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
        v = self.vision_config
        if v is not None:
            side = math.isqrt(self.mm_tokens_per_image)
            patches = v.image_size // v.patch_size
            if side * side != self.mm_tokens_per_image or patches % side:
                raise ConfigError(f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square whose side "
                                  f"divides the {patches}x{patches} patch grid")
            if not 0 <= self.image_token_id < self.vocab_size:
                raise ConfigError(f"image_token_index ({self.image_token_id}) is outside the vocabulary "
                                  f"(0..{self.vocab_size - 1})")

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None

    def text_only(self) -> "Gemma3Config":
        """The text decoder's config alone (``--text-only``)."""
        return replace(self, vision_config=None)

    # ---- derived ----
    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    # ---- HF config.json ----
    def to_hf(self) -> dict:
        if self.vision_config is None:
            return self._text_hf()
        text = self._text_hf()
        for k in ("architectures", "dtype"):
            text.pop(k)
        return {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text,
            "vision_config": self.vision_config.to_hf(),
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "boi_token_index": self.boi_token_id,
            "eoi_token_index": self.eoi_token_id,
            "image_token_index": self.image_token_id,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
        }

    def _text_hf(self) -> dict:
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
        mm = {}
        if d.get("model_type") == "gemma3" and "text_config" in d:  # multimodal wrapper
            outer = d
            if isinstance(outer.get("vision_config"), dict):
                mm = dict(
                    vision_config=SiglipVisionConfig.from_hf(outer["vision_config"], where),
                    mm_tokens_per_image=int(outer.get("mm_tokens_per_image", 256)),
                    boi_token_id=int(outer.get("boi_token_index", outer.get("boi_token_id", 255_999))),
                    eoi_token_id=int(outer.get("eoi_token_index", outer.get("eoi_token_id", 256_000))),
                    image_token_id=int(outer.get("image_token_index", outer.get("image_token_id", 262_144))),
                )
            d = {**HF_GEMMA3_TEXT_DEFAULTS, **d["text_config"], "model_type": "gemma3_text"}
            if "tie_word_embeddings" in outer and "tie_word_embeddings" not in d:
                d["tie_word_embeddings"] = outer["tie_word_embeddings"]
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
                **mm,
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

# SigLIP towers: the one every released Gemma 3 vision model (4B, 12B, 27B) uses, and a tiny one
VISION_PRESETS: dict[str, dict] = {
    "siglip-so400m-896": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=896, patch_size=14),
    "siglip-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=4),
}
# the released multimodal checkpoints (Gemma3ForConditionalGeneration) and a tiny debug one; the plain
# names above stay the text decoders (what --text-only loads)
for _size in ("4b", "12b", "27b"):
    PRESETS[f"gemma-3-{_size}-vision"] = dict(PRESETS[f"gemma-3-{_size}"],
                                               vision_config=VISION_PRESETS["siglip-so400m-896"],
                                               mm_tokens_per_image=256)
# tiny: a 32 px image is an 8x8 patch grid pooled to 2x2 = 4 soft tokens; the image tokens sit at the
# top of the 512-token vocabulary
PRESETS["gemma-3-tiny-vision"] = dict(PRESETS["gemma-3-tiny"], vision_config=VISION_PRESETS["siglip-tiny"],
                                      mm_tokens_per_image=4, boi_token_id=509, eoi_token_id=510, image_token_id=511)
