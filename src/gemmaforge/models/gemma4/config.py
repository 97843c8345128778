"""Gemma 4 text decoder config (``Gemma4TextConfig``; the text part of ``Gemma4Config``).

What differs from Gemma 3 (as transformers 5.23's ``Gemma4TextConfig`` defines it):
- per-layer shapes: full layers use ``global_head_dim`` and, only with ``attention_k_eq_v``,
  ``num_global_key_value_heads`` (transformers 5.23 writes these as ``per_layer_config``);
- KV sharing: layers ``>= L - num_kv_shared_layers`` reuse the K/V of the last non-shared layer
  of their type (``kv_sharing_modes``), and with ``use_double_wide_mlp`` their MLP is twice as wide;
- per-layer embeddings (PLE) of width ``hidden_size_per_layer_input`` (0 = none);
- optional MoE block (``enable_moe_block``) next to the dense MLP;
- the last layer is always full attention (the reference forces it, with a warning).

With a ``vision_config`` and/or an ``audio_config`` the config is the whole ``Gemma4Config`` of
``Gemma4ForConditionalGeneration`` (towers and their token ids; ``to_hf`` writes the wrapper with
the decoder as ``text_config``); ``text_only()`` drops the towers (``--text-only``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import ConfigError
from ..common.config import FULL, SLIDING, RopeSpec, rope_from_hf
from .audio import AUDIO_PRESETS, Gemma4AudioConfig
from .vision import VISION_PRESETS, Gemma4VisionConfig

SHARE_STORE = "store"
SHARE_REUSE = "reuse"


def default_gemma4_rope() -> dict[str, RopeSpec]:
    return {
        SLIDING: RopeSpec(theta=10_000.0),
        FULL: RopeSpec(theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25),
    }


@dataclass
class Gemma4Config:
    """Gemma 4 text decoder. Defaults mirror ``Gemma4TextConfig``'s except the final softcap (30,
    what every released checkpoint sets)."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    # K/V heads of full layers; only used with attention_k_eq_v (as in the reference)
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    sliding_window: int = 512
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    layer_types: list[str] = field(default_factory=list)
    rope: dict[str, RopeSpec] = field(default_factory=dict)
    final_logit_softcapping: float | None = 30.0
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    # per-layer embeddings (PLE); 0 disables them
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 262_144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    # "vision": tokens of one image attend to each other bidirectionally on sliding layers
    use_bidirectional_attention: str | None = None
    # placeholder ids of the multimodal wrapper (image / video / audio); the reference embeds them
    # as the pad token (main and per-layer embeddings) before splicing encoder features in
    mm_token_ids: list[int] = field(default_factory=list)
    # multimodal (None: text only): the towers and the wrapper's token ids (transformers' defaults)
    vision_config: Gemma4VisionConfig | None = None
    audio_config: Gemma4AudioConfig | None = None
    boi_token_id: int = 255_999  # <|image>
    eoi_token_id: int = 258_882  # <image|>
    image_token_id: int = 258_880  # <|image|>: the placeholder the image soft tokens replace
    video_token_id: int = 258_884
    boa_token_id: int = 256_000  # <|audio>
    eoa_token_id: int = 258_883  # <audio|>
    audio_token_id: int = 258_881  # <|audio|>

    model_type = "gemma4_text"
    architecture = "Gemma4ForCausalLM"

    def __post_init__(self):
        if not self.layer_types:
            # reference default: 5 sliding then 1 full
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types and self.layer_types[-1] != FULL:
            self.layer_types[-1] = FULL  # the reference forces the last layer to full attention
        if not self.rope:
            self.rope = default_gemma4_rope()
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        if isinstance(self.vision_config, dict):
            self.vision_config = Gemma4VisionConfig(**self.vision_config)
        if isinstance(self.audio_config, dict):
            self.audio_config = Gemma4AudioConfig(**self.audio_config)
        self.mm_token_ids = list(self.mm_token_ids)
        if self.is_multimodal and not self.mm_token_ids:
            self.mm_token_ids = [self.image_token_id, self.video_token_id, self.audio_token_id]
        self.validate()

    def validate(self):
        n = self.num_hidden_layers
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {n}")
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"layer_types: unknown layer type {t!r}")
            if t not in self.rope:
                raise ConfigError(f"rope_parameters: no entry for layer type {t!r}")
        for i in range(n):
            if self.num_attention_heads % self.kv_heads(i):
                raise ConfigError(f"layer {i}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                                  f"of its key/value heads ({self.kv_heads(i)})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a positive sliding_window")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"num_kv_shared_layers must be in [0, {n}); got {self.num_kv_shared_layers}")
        if self.num_kv_shared_layers:
            first = n - self.num_kv_shared_layers
            if set(self.layer_types[first:]) - set(self.layer_types[:first]):
                raise ConfigError("num_kv_shared_layers: a layer type of the shared layers has no earlier "
                                  "non-shared layer to take its keys/values from")
        if self.enable_moe_block:
            if not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
                raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
            if not 1 <= self.top_k_experts <= self.num_experts:
                raise ConfigError(f"top_k_experts ({self.top_k_experts}) must be in "
                                  f"[1, num_experts={self.num_experts}]")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ConfigError(f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
                              "(supported: null, \"vision\")")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported "
                              "(Gemma 4 uses gelu_pytorch_tanh)")
        if self.is_multimodal:
            for name in ("image_token_id", "audio_token_id", "boi_token_id", "eoi_token_id", "boa_token_id",
                         "eoa_token_id"):
                if not 0 <= getattr(self, name) < self.vocab_size:
                    raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary "
                                      f"(0..{self.vocab_size - 1})")

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None or self.audio_config is not None

    def text_only(self) -> "Gemma4Config":
        """The text decoder's config alone (``--text-only``): placeholders still embed as the pad token."""
        return replace(self, vision_config=None, audio_config=None)

    # ---- derived, per layer ----
    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == SLIDING else None

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim

    def head_dim_for(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def kv_heads(self, i: int) -> int:
        if self.layer_types[i] == FULL and self.attention_k_eq_v:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def k_eq_v(self, i: int) -> bool:
        """Full layers with attention_k_eq_v have no v_proj: V is the raw k_proj output."""
        return self.attention_k_eq_v and self.layer_types[i] == FULL

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """None (own K/V), "store" (last non-shared layer of its type) or "reuse" (reads the store)."""
        n = self.num_hidden_layers
        if not self.num_kv_shared_layers:
            return [None] * n
        first = n - self.num_kv_shared_layers
        modes: list[str | None] = [None if i < first else SHARE_REUSE for i in range(n)]
        for t in set(self.layer_types):
            producers = [i for i in range(first) if self.layer_types[i] == t]
            if producers:
                modes[producers[-1]] = SHARE_STORE
        return modes

    def kv_source(self, i: int) -> int:
        """Layer whose K/V layer ``i`` attends to (itself unless it is a reuse layer)."""
        if self.kv_sharing_modes[i] != SHARE_REUSE:
            return i
        t = self.layer_types[i]
        return max(j for j, m in enumerate(self.kv_sharing_modes) if m == SHARE_STORE and self.layer_types[j] == t)

    def mlp_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and self.kv_sharing_modes[i] == SHARE_REUSE
        return self.intermediate_size * (2 if wide else 1)

    # ---- HF config.json ----
    def to_hf(self) -> dict:
        if not self.is_multimodal:
            return self._text_hf()
        text = self._text_hf()
        for k in ("architectures", "dtype"):
            text.pop(k)
        return {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": None if self.vision_config is None else self.vision_config.to_hf(),
            "audio_config": None if self.audio_config is None else self.audio_config.to_hf(),
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "boa_token_id": self.boa_token_id,
            "eoa_token_index": self.eoa_token_id,
            "audio_token_id": self.audio_token_id,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": "float32",
        }

    def _text_hf(self) -> dict:
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            # the original (pre per_layer_config) keys: read by every transformers 5.x Gemma 4 config
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads if self.attention_k_eq_v else None,
            "attention_k_eq_v": self.attention_k_eq_v,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "layer_types": list(self.layer_types),
            "rope_parameters": {t: spec.to_hf() for t, spec in self.rope.items()},
            "final_logit_softcapping": self.final_logit_softcapping,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
            "hidden_activation": self.hidden_activation,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "enable_moe_block": self.enable_moe_block,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "use_bidirectional_attention": self.use_bidirectional_attention,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "dtype": "float32",
        }
        return d

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Gemma4Config":
        d = dict(d)
        mm_ids: list[int] = []
        towers: dict[str, Any] = {}
        if d.get("model_type") == "gemma4":  # multimodal wrapper: the text decoder is text_config
            if not isinstance(d.get("text_config"), dict):
                raise ConfigError(f"{where}: model_type 'gemma4' without a text_config object")
            mm_ids = [int(d[k]) for k in ("image_token_id", "video_token_id", "audio_token_id") if d.get(k) is not None]
            towers = _towers_from_hf(d, where)
            top_eos = d.get("eos_token_id")
            d = {**d["text_config"], "model_type": "gemma4_text"}
            if top_eos is not None and d.get("eos_token_id") is None:
                d["eos_token_id"] = top_eos
        if d.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{where}: use_bidirectional_attention='all' (embedding models) is not supported")
        if d.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not a Gemma 4 checkpoint")
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        try:
            n_layers = int(d["num_hidden_layers"])
            layer_types = d.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
            layer_types = list(layer_types)
            if layer_types and layer_types[-1] != FULL:
                layer_types[-1] = FULL
            rope = _gemma4rope_from_hf(d, where)
            heads = int(d["num_attention_heads"])
            kv = int(d.get("num_key_value_heads", heads))
            k_eq_v = bool(d.get("attention_k_eq_v", False))
            gdim = d.get("global_head_dim", 512)
            gkv = d.get("num_global_key_value_heads")
            plc = d.get("per_layer_config")
            if plc:
                gdim, gkv = _read_per_layer_config(plc, layer_types, int(d.get("head_dim") or 256), kv,
                                                   gdim, gkv, where)
            eos = d.get("eos_token_id", 1)
            ple = d.get("hidden_size_per_layer_input", 256)
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=kv,
                head_dim=int(d.get("head_dim") or 256),
                global_head_dim=int(gdim or 512),
                num_global_key_value_heads=int(gkv) if (gkv is not None and k_eq_v) else None,
                attention_k_eq_v=k_eq_v,
                sliding_window=int(d.get("sliding_window") or 512),
                max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                layer_types=layer_types,
                rope=rope,
                final_logit_softcapping=d.get("final_logit_softcapping"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else 0),
                eos_token_id=list(eos) if isinstance(eos, list) else [int(eos)],
                bos_token_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 2),
                hidden_activation=act,
                hidden_size_per_layer_input=int(ple or 0),
                vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or 262_144),
                num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
                use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
                enable_moe_block=bool(d.get("enable_moe_block", False)),
                num_experts=d.get("num_experts"),
                top_k_experts=d.get("top_k_experts"),
                moe_intermediate_size=d.get("moe_intermediate_size"),
                use_bidirectional_attention=d.get("use_bidirectional_attention"),
                mm_token_ids=mm_ids,
                **towers,
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: bad value ({e})") from None


# the wrapper's token-id keys (transformers spells the end-of-audio one eoa_token_index)
_TOKEN_KEYS = {"boi_token_id": ("boi_token_id",), "eoi_token_id": ("eoi_token_id",),
               "image_token_id": ("image_token_id",), "video_token_id": ("video_token_id",),
               "boa_token_id": ("boa_token_id",), "eoa_token_id": ("eoa_token_index", "eoa_token_id"),
               "audio_token_id": ("audio_token_id",)}


def _towers_from_hf(d: dict, where: str) -> dict[str, Any]:
    """The towers' configs and token ids of a ``Gemma4Config`` wrapper dict."""
    out: dict[str, Any] = {}
    for ours, keys in _TOKEN_KEYS.items():
        for k in keys:
            if d.get(k) is not None:
                out[ours] = int(d[k])
                break
    for key, cls in (("vision_config", Gemma4VisionConfig), ("audio_config", Gemma4AudioConfig)):
        sub = d.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: {key} must be an object or null")
        out[key] = cls.from_hf(sub, f"{where}: {key}")
    return out


def _gemma4rope_from_hf(d: dict, where: str) -> dict[str, RopeSpec]:
    rp = d.get("rope_parameters")
    if not rp:
        return default_gemma4_rope()
    if isinstance(rp, dict) and any(k in rp for k in (FULL, SLIDING)):
        defaults = default_gemma4_rope()
        out = {}
        for t, spec in defaults.items():
            given = rp.get(t)
            out[t] = RopeSpec.from_hf(given, spec.theta, f"{where}: rope_parameters.{t}") if given else spec
        return out
    return rope_from_hf(d, where, {FULL: 1_000_000.0, SLIDING: 10_000.0}, local_key=None)


def _read_per_layer_config(plc: dict, layer_types: list[str], head_dim: int, kv: int, gdim, gkv, where: str):
    """transformers 5.23 writes full-layer shapes as ``per_layer_config`` {layer: {head_dim, num_key_value_heads}}."""
    full_over: list[dict] = []
    for key, over in plc.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < len(layer_types):
            raise ConfigError(f"{where}: per_layer_config names layer {i}, outside 0..{len(layer_types) - 1}")
        extra = set(over) - {"head_dim", "num_key_value_heads"}
        if extra:
            raise ConfigError(f"{where}: per_layer_config.{key} overrides {sorted(extra)}; only head_dim and "
                              "num_key_value_heads of full-attention layers are supported")
        if layer_types[i] != FULL:
            raise ConfigError(f"{where}: per_layer_config.{key} overrides a {layer_types[i]} layer; Gemma 4 only "
                              "overrides full-attention layers")
        full_over.append(dict(over))
    n_full = layer_types.count(FULL)
    if full_over and (len(full_over) != n_full or any(o != full_over[0] for o in full_over)):
        raise ConfigError(f"{where}: per_layer_config must give every full-attention layer the same overrides")
    o = full_over[0] if full_over else {}
    return o.get("head_dim", head_dim), o.get("num_key_value_heads", gkv if gkv is not None else None)


# --------------------------------------------------------------------------------------------
# presets: published configs of the four released sizes, and tiny debug configs for tests

def _pattern(n_layers: int, period: int) -> list[str]:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]


PRESETS: dict[str, dict] = {}
PRESETS["gemma-4-e2b"] = dict(
    hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
    head_dim=256, global_head_dim=512, sliding_window=512, layer_types=_pattern(35, 5),
    hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True, eos_token_id=[1, 106])
PRESETS["gemma-4-e4b"] = dict(
    hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, global_head_dim=512, sliding_window=512, layer_types=_pattern(42, 6),
    hidden_size_per_layer_input=256, num_kv_shared_layers=18, eos_token_id=[1, 106])
PRESETS["gemma-4-31b"] = dict(
    hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
    layer_types=_pattern(60, 6), hidden_size_per_layer_input=0, max_position_embeddings=262_144,
    use_bidirectional_attention="vision", eos_token_id=[1, 106])
PRESETS["gemma-4-26b-a4b"] = dict(
    hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
    layer_types=_pattern(30, 6), hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144,
    use_bidirectional_attention="vision", eos_token_id=[1, 106])

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, global_head_dim=32, sliding_window=6, max_position_embeddings=1024,
             vocab_size_per_layer_input=512)
# E2B-like: PLE, KV sharing (both types have a store layer), double-wide MLP on reuse layers, 4:1 pattern
PRESETS["gemma-4-tiny-e2b"] = dict(
    _TINY, num_hidden_layers=7, layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL, SLIDING, FULL],
    hidden_size_per_layer_input=8, num_kv_shared_layers=3, use_double_wide_mlp=True)
# 31B-like: K=V on full layers with fewer global K/V heads, global head_dim != head_dim, no PLE
PRESETS["gemma-4-tiny-31b"] = dict(
    _TINY, num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL], num_key_value_heads=2,
    num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=0)
# 26B-A4B-like: MoE block (dense MLP + experts) with K=V full layers
PRESETS["gemma-4-tiny-moe"] = dict(
    _TINY, num_hidden_layers=4, layer_types=[SLIDING, FULL, SLIDING, FULL], num_global_key_value_heads=1,
    attention_k_eq_v=True, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=6, top_k_experts=3,
    moe_intermediate_size=24)

# the released multimodal checkpoints (Gemma4ForConditionalGeneration): E2B/E4B see and hear, 26B/31B see;
# the plain names above stay the text decoders (what --text-only loads)
for _size in ("e2b", "e4b", "26b-a4b", "31b"):
    PRESETS[f"gemma-4-{_size}-mm"] = dict(
        PRESETS[f"gemma-4-{_size}"], vision_config=VISION_PRESETS[f"gemma-4-{_size}"],
        audio_config=AUDIO_PRESETS[f"gemma-4-{_size}"] if f"gemma-4-{_size}" in AUDIO_PRESETS else None)
# tiny E2B-like with both towers; the media tokens sit at the top of the 512-token vocabulary
PRESETS["gemma-4-tiny-e2b-mm"] = dict(
    PRESETS["gemma-4-tiny-e2b"], vision_config=VISION_PRESETS["tiny"], audio_config=AUDIO_PRESETS["tiny"],
    boi_token_id=504, eoi_token_id=505, image_token_id=506, video_token_id=507, boa_token_id=508, eoa_token_id=509,
    audio_token_id=510)
# tiny 31B-like (K=V full layers, image tokens bidirectional on sliding layers) with a standardised tower
PRESETS["gemma-4-tiny-31b-mm"] = dict(
    PRESETS["gemma-4-tiny-31b"], use_bidirectional_attention="vision",
    vision_config=dict(VISION_PRESETS["tiny"], standardize=True),
    boi_token_id=504, eoi_token_id=505, image_token_id=506, video_token_id=507, boa_token_id=508, eoa_token_id=509,
    audio_token_id=510)
