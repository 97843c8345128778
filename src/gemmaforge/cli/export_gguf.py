"""``gemmaforge export-gguf``: a model (a LoRA adapter merged first) -> one llama.cpp GGUF file."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def register(sub) -> None:
    e = sub.add_parser("export-gguf", help="write a model (LoRA adapter merged) as a llama.cpp GGUF file")
    e.add_argument("--model", default=None,
                   help="HF dir, .gguf file or preset name (default: the embedded gemma-3-270m)")
    e.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format), merged into the weights first")
    e.add_argument("--out", required=True, help="the .gguf file to write (its folder must exist)")
    e.add_argument("--dtype", default="f16",
                   help="f32, f16 (default, as llama.cpp's converter), bf16 or q8_0; norms and 1-D tensors stay f32")
    e.add_argument("--name", default=None, help="general.name in the file (default: the model's name)")
    e.set_defaults(func=cmd_export_gguf)


def _model_name(model_arg: str | None, adapter: str | None) -> str:
    from ..formats.resolve import DEFAULT_MODEL

    s = str(model_arg or DEFAULT_MODEL).rstrip("/\\")
    base = Path(s).stem if s.endswith(".gguf") else Path(s).name
    return f"{base}-{Path(adapter.rstrip('/')).name}" if adapter else base


def cmd_export_gguf(a) -> int:
    import warnings

    from ..api import from_pretrained, load_tokenizer
    from ..errors import CheckpointError
    from ..formats.gguf.writer import (GGUFExportWarning, check_dtype, check_output_path, export_gguf,
                                       gguf_architecture, source_chat_template)
    from ..formats.resolve import resolve

    # everything the user typed is checked before the model loads
    dtype = check_dtype(a.dtype)
    out = check_output_path(a.out)
    if a.adapter is not None and not Path(a.adapter).is_dir():
        raise CheckpointError(f"{a.adapter}: adapter directory does not exist")
    t0 = time.perf_counter()
    src = resolve(a.model)
    model = from_pretrained(src)
    gguf_architecture(model)  # a family without a llama.cpp mapping stops here, before the tokenizer
    if a.adapter is not None:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
    tok = load_tokenizer(src)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", GGUFExportWarning)
        path = export_gguf(model, tok, out, dtype=dtype, name=a.name or _model_name(a.model, a.adapter),
                           chat_template=source_chat_template(src))
    for n in notes:
        if issubclass(n.category, GGUFExportWarning):
            print(f"gemmaforge: note: {n.message}", file=sys.stderr)
        else:
            warnings.showwarning(n.message, n.category, n.filename, n.lineno)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {dtype}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
