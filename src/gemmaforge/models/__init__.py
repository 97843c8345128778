"""One model file per family; ``build_model`` picks the class from the config type."""

from __future__ import annotations

import torch

from ..config import Gemma3Config, MistralConfig
from .gemma3 import Gemma3ForCausalLM
from .mistral import MistralForCausalLM

MODEL_CLASSES: dict[type, type] = {Gemma3Config: Gemma3ForCausalLM, MistralConfig: MistralForCausalLM}


def register_model(config_cls: type, model_cls: type) -> None:
    MODEL_CLASSES[config_cls] = model_cls


def build_model(cfg, *, dtype: torch.dtype = torch.float32, device="cpu", init: bool = True):
    """Instantiate the family's model; ``device="meta"`` builds without allocating (for sharding)."""
    cls = MODEL_CLASSES[type(cfg)]
    with torch.device(device):
        model = cls(cfg)
    if device != "meta":
        model.to(dtype=dtype)
        if init:
            model.init_weights()
    else:
        model.to(dtype=dtype)
    return model

from . import gemma4  # noqa: E402,F401  (registers Gemma4Config -> Gemma4ForCausalLM)
