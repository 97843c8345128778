"""One-time format conversion: GGUF or HF dir -> HF dir (config, safetensors, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def load_any(src: Path, dtype=None, device="cpu", with_tokenizer: bool = True):
    """(model, tokenizer or None) from an HF dir or a .gguf file.

    ``with_tokenizer=False`` skips parsing an HF dir's tokenizer.json (2 s for Gemma's 262k vocabulary)
    when the caller only wants the model."""
    import torch

    from ..config import config_from_hf
    from ..models import build_model
    from .hf import load_hf_state, load_into

    dtype = dtype or torch.float32
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: path does not exist")
    tok = None
    if src.is_file():
        if src.suffix != ".gguf":
            raise CheckpointError(f"{src}: expected an HF model directory or a .gguf file")
        from ..tokenizer import Tokenizer
        from .gguf import load_gguf

        hf_cfg, sd, tok_json = load_gguf(src)
        cfg = config_from_hf(hf_cfg, str(src))
        tok = Tokenizer.from_json(json.dumps(tok_json))
    else:
        cfg, sd = load_hf_state(src)
        if with_tokenizer and (src / "tokenizer.json").exists():
            from ..tokenizer import Tokenizer

            tok = Tokenizer.from_file(src)
    model = build_model(cfg, dtype=dtype, device="meta")
    load_into(model, sd, str(src), dtype=dtype, device=device)
    return model.eval(), tok


def convert(src: str | Path, dst: str | Path, progress: bool = False) -> Path:
    """Write ``dst`` as an HF-format dir loadable by gemmaforge and transformers."""
    from .hf import save_hf

    src, dst = Path(src), Path(dst)
    model, tok = load_any(src)
    return save_hf(model, dst, tokenizer=tok)
