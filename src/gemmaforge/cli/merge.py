"""``gemmaforge merge``: fold a LoRA adapter into the base weights and write an HF dir."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import check_adapter


def register(sub) -> None:
    mg = sub.add_parser("merge", help="fold a LoRA adapter into the base weights and write an HF dir")
    mg.add_argument("--model", default=None, help="base model (HF dir, .gguf or preset; default gemma-3-270m)")
    mg.add_argument("--adapter", required=True, help="LoRA adapter dir (PEFT format)")
    mg.add_argument("--out", required=True, help="output HF-format dir")
    mg.set_defaults(func=cmd_merge)


def cmd_merge(a) -> int:
    from ..adapters.lora import merged_copy
    from ..api import from_pretrained, load_tokenizer
    from ..errors import InputError
    from ..formats.hf import save_hf
    from ..formats.peft import load_adapter

    check_adapter(a.adapter)  # before the model loads
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    model = from_pretrained(a.model)
    load_adapter(model, a.adapter)
    out = save_hf(merged_copy(model), a.out, tokenizer=load_tokenizer(a.model))
    print(f"wrote merged model to {out}", file=sys.stderr)
    return 0
