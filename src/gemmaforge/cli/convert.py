"""``gemmaforge convert``: a GGUF file or HF dir -> an HF-format dir."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def register(sub) -> None:
    c = sub.add_parser("convert", help="GGUF file or HF dir -> HF-format dir")
    c.add_argument("src", help="a .gguf file, an HF model dir, or a preset name with embedded weights (gemma-3-270m)")
    c.add_argument("dst", help="the HF-format dir to write (config.json, model.safetensors, tokenizer files)")
    c.set_defaults(func=cmd_convert)


def cmd_convert(a) -> int:
    from ..errors import InputError
    from ..formats.convert import convert
    from ..formats.resolve import resolve

    dst = Path(a.dst)
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a directory")
    t0 = time.perf_counter()
    out = convert(resolve(a.src), dst)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
