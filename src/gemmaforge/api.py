"""The Python entry points users call: load a model, a tokenizer; the one place that joins the model
registry and the checkpoint formats."""

from __future__ import annotations

import os

import torch

from . import cpu_policy
from .errors import CheckpointError
from .formats.convert import load_any
from .formats.convert import load_tokenizer as _load_tokenizer
from .formats.resolve import resolve
from .models.registry import build_model, preset


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from {', '.join(table)})")
    return table[dtype]


def from_pretrained(path_or_preset: str | os.PathLike | None = None, dtype=torch.float32, device="cpu",
                    text_only: bool = False):
    """Load a model from an HF dir, a .gguf file, or a preset name (``gemma-3-270m`` = embedded default).

    A multimodal checkpoint (``Gemma3ForConditionalGeneration``) loads whole, towers included;
    ``text_only=True`` loads its text decoder alone. On CPU the model gets the CPU policy's
    blocked-logits head (``cpu_policy.for_inference``)."""
    model, _ = load_any(resolve(path_or_preset), dtype=_dtype(dtype), device=device, with_tokenizer=False,
                        text_only=text_only)
    return cpu_policy.for_inference(model)


def from_config(cfg_or_preset, dtype=torch.float32, device="cpu", seed: int | None = None):
    """A randomly initialised model from a config object or preset name (tests, experiments)."""
    cfg = preset(cfg_or_preset) if isinstance(cfg_or_preset, str) else cfg_or_preset
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(cfg, dtype=_dtype(dtype), device=device).eval()


def load_processor(path_or_preset: str | os.PathLike | None = None):
    """The processor of a model: its tokenizer and, for a multimodal model, its media handlers
    (``processor(messages=..., images=...)`` -> ``input_ids``, ``pixel_values``, ``token_types``...).

    An HF dir reads ``config.json``, ``tokenizer.json`` and ``preprocessor_config.json`` (the
    checkpoint's defaults when absent). A multimodal preset name (``gemma-3-4b-vision``...) pairs the
    preset's config with the embedded Gemma 3 tokenizer (the same vocabulary)."""
    from pathlib import Path

    from .formats.processor import build_processor, read_preprocessor
    from .formats.resolve import DEFAULT_MODEL
    from .models.registry import PRESETS, load_config

    s = str(path_or_preset) if path_or_preset is not None else DEFAULT_MODEL
    if s in PRESETS and not Path(s).exists():
        return build_processor(preset(s), _load_tokenizer(resolve(DEFAULT_MODEL)))
    src = resolve(path_or_preset)
    if src.is_file():  # a .gguf: text only
        return build_processor(None, _load_tokenizer(src))
    return build_processor(load_config(src), _load_tokenizer(src), read_preprocessor(src))


def load_tokenizer(path_or_preset: str | os.PathLike | None = None):
    """Tokenizer of an HF dir (tokenizer.json), a .gguf file, or a preset name."""
    return _load_tokenizer(resolve(path_or_preset))
