"""Training a multimodal model: the processor as the data's tokenizer, frozen towers, LoRA targets.

- Towers (every module a ``MediaSpec`` names: Gemma 3's SigLIP and projector) are frozen by default:
  their parameters get ``requires_grad=False`` before the optimizer is built, so they hold no
  gradient and no optimizer state; ``--train-vision`` / ``--train-audio`` train them too.
- LoRA's default targets on a multimodal model are the text decoder's seven projections (not the
  towers' same-named q/k/v), plus, with ``--train-vision`` / ``--train-audio``, every linear layer
  of those towers. Targets given by name keep PEFT's semantics (suffix or regex over the whole model).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ..adapters.lora import DEFAULT_TARGETS
from ..formats.processor import build_processor, read_preprocessor
from ..models.common.media import tower_modules
from ..models.registry import load_config

MODALITY_OF_FLAG = {"train_vision": ("image", "video"), "train_audio": ("audio",)}


def load_processor_for(src: Path, load_tokenizer):
    """The model's processor when ``src`` is a multimodal HF dir, else its plain tokenizer."""
    tok = load_tokenizer(src)
    if src.is_dir() and (src / "config.json").exists():
        cfg = load_config(src)
        if getattr(cfg, "is_multimodal", False):
            return build_processor(cfg, tok, read_preprocessor(src))
    return tok


def _trained_modalities(train_vision: bool, train_audio: bool) -> set[str]:
    out = set()
    if train_vision:
        out |= set(MODALITY_OF_FLAG["train_vision"])
    if train_audio:
        out |= set(MODALITY_OF_FLAG["train_audio"])
    return out


def freeze_towers(model: nn.Module, train_vision: bool = False, train_audio: bool = False) -> list[str]:
    """Freeze the towers of the modalities not trained; returns the frozen module paths."""
    if not hasattr(model, "media_specs"):
        return []
    trained = _trained_modalities(train_vision, train_audio)
    frozen = []
    for spec in model.media_specs():
        if spec.modality in trained:
            continue
        for path in spec.towers:
            model.get_submodule(path).requires_grad_(False)
            frozen.append(path)
    return sorted(set(frozen))


def default_lora_targets(model: nn.Module, train_vision: bool = False, train_audio: bool = False):
    """None (the adapters' defaults) for a text-only model; for a multimodal one a regex over our
    module names: the decoder's projections, and every linear layer of the trained towers."""
    specs = model.media_specs() if hasattr(model, "media_specs") else []
    if not specs:
        return None
    alts = [r"model\.layers\.\d+\..*\.(" + "|".join(DEFAULT_TARGETS) + ")"]
    trained = _trained_modalities(train_vision, train_audio)
    for path, tower in tower_modules(model, tuple(trained)):
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in tower.named_modules() if isinstance(m, nn.Linear)})
        if leaves:
            alts.append(re.escape(path) + r"\.(.*\.)?(" + "|".join(map(re.escape, leaves)) + ")")
    return "(" + "|".join(alts) + ")"
