"""``gemmaforge convert``: a GGUF file or HF dir -> an HF-format dir."""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    c = sub.add_parser("convert", help="GGUF file or HF dir -> HF-format dir")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=cmd_convert)


def cmd_convert(a) -> int:
    from ..formats.convert import convert

    t0 = time.perf_counter()
    out = convert(a.src, a.dst)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
