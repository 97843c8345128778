"""Building a model's processor (tokenizer + media handlers) from an HF dir or a preset.

The family's builder reads the model config (token ids, tokens per image, the tower's image size) and
``preprocessor_config.json`` (resize, rescale, normalise values), falling back to the checkpoint's
defaults when the file is absent. A text-only model's processor is its tokenizer with no handler.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.gemma4_media import gemma4_handlers
from ..data.images import Gemma3ImageConfig, Gemma3ImageProcessor
from ..data.processor import Gemma3ImageHandler, Processor
from ..errors import ConfigError
from ..models.gemma3.config import Gemma3Config
from ..models.gemma4.config import Gemma4Config


def gemma3_handlers(cfg: Gemma3Config, preprocessor: dict | None, tokenizer) -> list:
    if cfg.vision_config is None:
        return []
    pre = preprocessor or {}
    img_cfg = Gemma3ImageConfig.from_hf(pre, image_size=cfg.vision_config.image_size)
    seq = int(pre.get("image_seq_length", cfg.mm_tokens_per_image))
    if seq != cfg.mm_tokens_per_image:
        raise ConfigError(f"preprocessor image_seq_length {seq} differs from the model's mm_tokens_per_image "
                          f"{cfg.mm_tokens_per_image}")
    return [Gemma3ImageHandler(Gemma3ImageProcessor(img_cfg), image_seq_length=seq, boi_id=cfg.boi_token_id,
                               eoi_id=cfg.eoi_token_id, image_id=cfg.image_token_id)]


# config class -> handlers(cfg, preprocessor_config dict or None, tokenizer)
HANDLER_BUILDERS = {Gemma3Config: gemma3_handlers, Gemma4Config: gemma4_handlers}


def build_processor(cfg, tokenizer, preprocessor: dict | None = None) -> Processor:
    builder = HANDLER_BUILDERS.get(type(cfg))
    handlers = builder(cfg, preprocessor, tokenizer) if builder is not None and getattr(cfg, "is_multimodal", False) \
        else []
    return Processor(tokenizer, handlers)


def read_preprocessor(d: Path) -> dict | None:
    """``preprocessor_config.json`` merged with ``processor_config.json`` (None when neither exists)."""
    out, found = {}, False
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = d / name
        if f.is_file():
            found = True
            try:
                out.update(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return out if found else None
