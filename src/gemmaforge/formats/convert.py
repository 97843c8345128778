"""One-time format conversion: GGUF or HF dir -> HF dir (config, safetensors, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError
from ..models.registry import build_model, config_from_hf
from .gguf import load_gguf, load_gguf_tokenizer
from .hf import load_hf_state, load_into, save_hf


def load_any(src: Path, dtype=None, device="cpu", with_tokenizer: bool = True, text_only: bool = False):
    """(model, tokenizer or None) from an HF dir or a .gguf file.

    A multimodal HF dir builds the whole model (towers included); ``text_only=True`` its text decoder.

    ``with_tokenizer=False`` skips parsing an HF dir's tokenizer.json (2 s for Gemma's 262k vocabulary)
    when the caller only wants the model."""
    import torch

    dtype = dtype or torch.float32
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: path does not exist")
    tok = None
    if src.is_file():
        if src.suffix != ".gguf":
            raise CheckpointError(f"{src}: expected an HF model directory or a .gguf file")
        hf_cfg, sd, tok_json = load_gguf(src)
        cfg = config_from_hf(hf_cfg, str(src))
        tok = Tokenizer.from_json(json.dumps(tok_json))
    else:
        cfg, sd = load_hf_state(src, text_only=text_only)
        if with_tokenizer and (src / "tokenizer.json").exists():
            tok = Tokenizer.from_file(src)
    model = build_model(cfg, dtype=dtype, device="meta")
    load_into(model, sd, str(src), dtype=dtype, device=device)
    return model.eval(), tok


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write ``dst`` as an HF-format dir loadable by gemmaforge and transformers."""
    src, dst = Path(src), Path(dst)
    model, tok = load_any(src)
    return save_hf(model, dst, tokenizer=tok)


def load_tokenizer(src: str | Path) -> Tokenizer:
    """The tokenizer of an HF dir (``tokenizer.json``) or a ``.gguf`` file."""
    p = Path(src)
    if p.is_file() and p.suffix == ".gguf":
        return Tokenizer.from_json(json.dumps(load_gguf_tokenizer(p)))
    if not (p / "tokenizer.json").exists():
        raise CheckpointError(f"{p}: no tokenizer.json")
    return Tokenizer.from_file(p)
