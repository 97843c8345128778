"""``gemmaforge eval``: the loss, perplexity and token count of a model (and adapter) on data of one's own.

    gemmaforge eval --data F [F ...] [--model M] [--adapter DIR] [--seq-len N] [--batch-tokens N]
                    [--json] [--device D] [--dtype auto|float32|bfloat16] [--attn-backend B] [--no-progress]

The data is read and packed exactly as ``gemmaforge train`` reads it (``.txt`` files, directories of
them, ``.jsonl`` with text / prompt+completion / chat messages; loss masks honoured) and evaluated by
the trainer's own step (``train.evaluate``): loss = the mean cross-entropy over every token with a
label, perplexity = exp(loss). Prints one line to stdout (``--json``: one JSON object). A progress
bar on stderr when it is a terminal; otherwise a plain line at most every 30 seconds.

Importing this module has no side effects (torch is imported when the command runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import add_model_args, check_device

DEFAULT_SEQ_LEN = 1024  # capped at the model's context
DEFAULT_BATCH_TOKENS = 8192  # at least one row


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="loss, perplexity and token count on data of one's own (same formats as train)",
        description="Evaluate a model (and LoRA adapter) on .txt / directories / .jsonl data read and packed as "
                    "`gemmaforge train` reads it (loss masks of prompt/completion and chat data honoured): "
                    "prints the mean token loss, the perplexity exp(loss) and the number of tokens scored.")
    add_model_args(p)
    p.set_defaults(dtype="auto")
    for action in p._actions:
        if "--dtype" in action.option_strings:
            action.help = ("auto (default: bf16 autocast on CUDA and on a CPU with native bf16, as train's validation), float32 or "
                           "bfloat16 (autocast; the weights stay fp32)")
    p.add_argument("--data", nargs="+", required=True, help=".txt files, directories of them, or .jsonl")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) applied to the model")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"packed row length (default {DEFAULT_SEQ_LEN}, at most the model's context); longer "
                        f"documents are cut into pieces, as in training")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help=f"tokens per forward, a multiple of --seq-len rows (default {DEFAULT_BATCH_TOKENS}, at least "
                        f"one row)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=cmd_eval)
    return p


# --------------------------------------------------------------------------- checks


def _check_flags(a) -> None:
    from ..errors import InputError

    if a.seq_len is not None and a.seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 (a row of one token predicts nothing); got {a.seq_len}")
    if a.batch_tokens is not None:
        if a.batch_tokens < 1:
            raise InputError(f"--batch-tokens must be positive; got {a.batch_tokens}")
        if a.seq_len is not None and a.batch_tokens < a.seq_len:
            raise InputError(f"--batch-tokens {a.batch_tokens} is less than one row (--seq-len {a.seq_len})")
    if a.adapter is not None:
        d = Path(a.adapter)
        if not d.is_dir():
            raise InputError(f"--adapter {d}: no such directory")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (d / name).is_file():
                raise InputError(f"--adapter {d}: no {name} (not a PEFT adapter directory)")


class _Progress:
    """tqdm on a terminal; elsewhere a plain stderr line at most every ``every`` seconds; or nothing."""

    def __init__(self, enabled: bool, every: float = 30.0):
        self.bar = None
        self.enabled = enabled
        self.every = every
        self.t0 = self.last = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc="evaluating", unit="row", file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif self.enabled:
            now = time.perf_counter()
            if now - self.last >= self.every and done < total:
                self.last = now
                print(f"eval: {done}/{total} rows ({now - self.t0:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- command


def cmd_eval(a) -> int:
    from ..errors import DataError, InputError

    import torch

    _check_flags(a)  # bad flags fail before anything loads
    device = torch.device(check_device(a.device))
    from ..cpu_policy import training_dtype

    autocast = training_dtype(a.dtype, device)  # train's rule: weights stay fp32, the forward autocasts

    from ..api import from_pretrained, load_processor, load_tokenizer
    from ..data import load_documents
    from ..formats.peft import load_adapter
    from ..train.evaluate import evaluate

    t0 = time.perf_counter()
    # a multimodal model's processor reads the image parts of chat data (a text-only one's is its tokenizer)
    tok = load_tokenizer(a.model) if getattr(a, "text_only", False) else load_processor(a.model)
    docs = load_documents(a.data, tok)  # bad data fails before the model loads: file:line
    if not docs:
        raise DataError(f"{', '.join(a.data)}: no documents")
    model = from_pretrained(a.model, dtype="float32", device=device, text_only=bool(getattr(a, "text_only", False)))
    model.attn_backend = a.attn_backend
    if a.adapter:
        load_adapter(model, a.adapter)
    context = int(model.config.max_position_embeddings)
    if a.seq_len is not None and a.seq_len > context:
        raise InputError(f"--seq-len {a.seq_len} is longer than the model's context ({context} tokens)")
    seq_len = a.seq_len or min(DEFAULT_SEQ_LEN, context)
    batch_tokens = a.batch_tokens or max(DEFAULT_BATCH_TOKENS, seq_len)
    if batch_tokens < seq_len:
        raise InputError(f"--batch-tokens {batch_tokens} is less than one row (--seq-len {seq_len})")
    name = a.model or "gemma-3-270m"
    print(f"loaded {name}{' + ' + a.adapter if a.adapter else ''} and {len(docs)} documents in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)

    progress = _Progress(not a.no_progress)
    t1 = time.perf_counter()
    try:
        res = evaluate(model, docs, seq_len, batch_tokens=batch_tokens, autocast=autocast, progress=progress)
    finally:
        progress.close()
    dt = time.perf_counter() - t1
    if res is None:
        raise DataError(f"{', '.join(a.data)}: no token to evaluate (every label is masked)")
    print(f"evaluated {res['tokens']} tokens ({res['rows']} rows of {seq_len}) in {dt:.2f}s", file=sys.stderr)
    if a.json:
        out = {"loss": res["loss"], "perplexity": res["perplexity"], "tokens": res["tokens"],
               "documents": res["documents"], "rows": res["rows"], "seq_len": seq_len, "model": name,
               "adapter": a.adapter, "data": list(a.data), "seconds": round(dt, 3)}
        print(json.dumps(out))
    else:
        print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.4f}  tokens {res['tokens']}  "
              f"documents {res['documents']}")
    return 0
