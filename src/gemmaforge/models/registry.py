"""Which families exist: a literal table from HF ``model_type`` to (config class, model class), the
presets by official name, and the entry points that pick a family from a config.

Nothing registers itself as an import side effect: adding a family means adding its rows here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .common.config import read_json
from .gemma3 import config as gemma3_config
from .gemma3.config import Gemma3Config
from .gemma3.model import Gemma3ForCausalLM
from .gemma3.vision import Gemma3ForConditionalGeneration
from .gemma4 import config as gemma4_config
from .gemma4.config import Gemma4Config
from .gemma4.model import Gemma4ForCausalLM
from .gemma4.multimodal import Gemma4ForConditionalGeneration
from .mistral import config as mistral_config
from .mistral.config import MistralConfig
from .mistral.model import MistralForCausalLM

# HF config.json ``model_type`` -> config class; the multimodal wrappers ("gemma3", "gemma4") map to
# their text decoder (their from_hf reads ``text_config``)
CONFIG_CLASSES: dict[str, type] = {
    "gemma3_text": Gemma3Config,
    "gemma3": Gemma3Config,
    "gemma4_text": Gemma4Config,
    "gemma4": Gemma4Config,
    "mistral": MistralConfig,
}

# config class -> the family's model
MODEL_CLASSES: dict[type, type] = {
    Gemma3Config: Gemma3ForCausalLM,
    Gemma4Config: Gemma4ForCausalLM,
    MistralConfig: MistralForCausalLM,
}

# config class -> the family's whole multimodal model (towers included), used when the config has towers
# (``cfg.is_multimodal``); ``--text-only`` builds ``MODEL_CLASSES`` from ``cfg.text_only()``
MULTIMODAL_CLASSES: dict[type, type] = {
    Gemma3Config: Gemma3ForConditionalGeneration,
    Gemma4Config: Gemma4ForConditionalGeneration,
}

# preset name -> (config class, constructor kwargs)
PRESETS: dict[str, tuple[type, dict]] = {
    **{name: (Gemma3Config, kw) for name, kw in gemma3_config.PRESETS.items()},
    **{name: (Gemma4Config, kw) for name, kw in gemma4_config.PRESETS.items()},
    **{name: (MistralConfig, kw) for name, kw in mistral_config.PRESETS.items()},
}


def preset(name: str, **overrides):
    """Config of an official preset (``gemma-3-270m``...) or tiny debug preset, with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    cls, kw = PRESETS[name]
    kw = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in kw.items()}
    kw.update(overrides)
    return cls(**kw)


def config_from_hf(d: dict, where: str = "config.json"):
    """The family config of an HF ``config.json`` dict; one-line ConfigError for unknown families."""
    mt = d.get("model_type")
    if mt not in CONFIG_CLASSES:
        archs = d.get("architectures")
        raise ConfigError(
            f"{where}: unsupported architecture (model_type={mt!r}, architectures={archs}); "
            f"supported model_type: {', '.join(sorted(CONFIG_CLASSES))}"
        )
    return CONFIG_CLASSES[mt].from_hf(d, where)


def load_config(path: str | Path):
    """Read an HF config.json (a file or a directory containing one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    return config_from_hf(read_json(p), str(p))


def model_class(cfg) -> type:
    """The model class a config builds: the multimodal one when the config has towers."""
    if getattr(cfg, "is_multimodal", False) and type(cfg) in MULTIMODAL_CLASSES:
        return MULTIMODAL_CLASSES[type(cfg)]
    return MODEL_CLASSES[type(cfg)]


def build_model(cfg, *, dtype: torch.dtype = torch.float32, device="cpu", init: bool = True):
    """Instantiate the family's model; ``device="meta"`` builds without allocating (for sharding and loading)."""
    cls = model_class(cfg)
    with torch.device(device):
        model = cls(cfg)
    model.to(dtype=dtype)
    if device != "meta" and init:
        model.init_weights()
    return model
