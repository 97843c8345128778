"""``gemmaforge inspect``: attention heatmaps and a logit lens of one prompt, as PNG files.

    gemmaforge inspect --prompt "The capital of France is" --out inspect/
    -> inspect/attn_layer_00.png ... attn_layer_17.png, inspect/logit_lens.png, inspect/logit_lens.txt

"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import add_model_args, check_adapter, check_device


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``inspect`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "inspect", help="attention heatmaps and a logit lens of one prompt (PNG files)",
        description="Run one prompt with hooks and write attn_layer_XX.png (one per layer, one panel per head), "
                    "logit_lens.png and logit_lens.txt (top tokens of every layer's residual stream) to --out.")
    add_model_args(p)  # the same --model/--dtype/--device/--attn-backend as every command
    p.add_argument("--prompt", required=True, help="the text to inspect (BOS is added)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--max-layers", type=int, default=None,
                   help="attention heatmaps for the first N layers only (the logit lens always shows every layer)")
    p.add_argument("--top-k", type=int, default=5, help="tokens per layer and position in logit_lens.txt")
    p.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(a) -> int:
    from ..errors import InputError

    if not a.prompt:
        raise InputError("--prompt is empty")
    if a.max_layers is not None and a.max_layers < 1:
        raise InputError(f"--max-layers must be at least 1; got {a.max_layers}")
    if a.top_k < 1:
        raise InputError(f"--top-k must be at least 1; got {a.top_k}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")

    from tqdm import tqdm

    from .. import interp
    from ..api import from_pretrained, load_tokenizer

    device = check_device(a.device)
    check_adapter(a.adapter)
    t0 = time.perf_counter()
    model = from_pretrained(a.model, dtype=a.dtype, device=device, text_only=bool(getattr(a, "text_only", False)))
    model.attn_backend = getattr(a, "attn_backend", None)
    if a.adapter:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
    tok = load_tokenizer(a.model)
    ids = tok.encode(a.prompt)
    n_layers = len(model.model.layers)
    n_maps = n_layers if a.max_layers is None else min(a.max_layers, n_layers)
    print(f"loaded {a.model or 'gemma-3-270m'}{' + ' + a.adapter if a.adapter else ''} in {time.perf_counter() - t0:.1f}s; prompt of {len(ids)} tokens",
          file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=n_maps + 1, desc="inspect", unit="plot", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty() and not a.progress)
    t1 = time.perf_counter()
    written = interp.attention_heatmaps(model, tok, ids, out, max_layers=n_maps, on_layer=lambda _: bar.update(1))
    written += list(interp.logit_lens_table(model, tok, ids, out, k=a.top_k))
    bar.update(1)
    bar.close()
    for path in written:
        print(path)
    print(f"wrote {len(written)} files to {out} in {time.perf_counter() - t1:.1f}s", file=sys.stderr)
    return 0
