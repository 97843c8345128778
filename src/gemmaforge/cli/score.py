"""``gemmaforge score``: per-token log-probs of completions given prompts (RL rollouts, evaluation).

    gemmaforge score --data rollouts.jsonl --out scores.jsonl [--model M] [--adapter DIR]
                     [--temperature T] [--batch-tokens N]

Each input line is ``{"prompt": str, "completion": str}`` (the prompt is tokenized with BOS, the
completion separately without BOS, nothing appended) or ``{"prompt_ids": [...],
"completion_ids": [...]}`` (used verbatim). An ``"id"`` field, if present, is copied through.
Blank lines are skipped. Each output line (same order as the input lines) holds
``logprobs`` (one per completion token, natural log), ``logprob_sum``, ``entropy_mean`` (mean
over the completion tokens of the entropy of the next-token distribution that produced them;
null for an empty completion) and ``num_tokens``.

Importing this module has no side effects (torch is imported when the command runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import add_model_args, check_device


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``score`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "score", help="per-token log-probs of completions (JSONL in, JSONL out)",
        description="Score {\"prompt\", \"completion\"} (or {\"prompt_ids\", \"completion_ids\"}) JSONL lines: "
                    "writes one line per input with the completion's per-token log-probs, their sum, the "
                    "mean entropy and the token count.")
    add_model_args(p)  # the same --model/--dtype/--device/--attn-backend as every command
    p.add_argument("--data", required=True, help="input .jsonl")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) applied to the model")
    p.add_argument("--temperature", type=float, default=1.0, help="score softmax(logits / T) (default 1)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per packed row (lines are never split; a longer line gets its own row)")
    p.add_argument("--chunk-size", type=int, default=None, help="positions per LM-head chunk")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    p.set_defaults(func=cmd_score)
    return p


# --------------------------------------------------------------------------- command


def cmd_score(a) -> int:
    from ..errors import InputError

    if a.batch_tokens is None or a.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be at least 1; got {a.batch_tokens}")
    if not a.temperature > 0:
        raise InputError(f"--temperature must be positive; got {a.temperature}")
    if a.chunk_size is not None and a.chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1; got {a.chunk_size}")
    out = Path(a.out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: cannot write into {parent}")

    import torch
    from tqdm import tqdm

    from ..api import from_pretrained, load_tokenizer
    from ..rl.rollouts import encode_rollouts, parse_rollouts
    from ..rl.score import DEFAULT_CHUNK, RolloutBatch, pack_rollouts, score

    records = parse_rollouts(a.data)  # a malformed file fails before the model is loaded
    t0 = time.perf_counter()
    device = check_device(a.device)
    model = from_pretrained(a.model, dtype=a.dtype, device=device, text_only=bool(getattr(a, "text_only", False)))
    model.attn_backend = getattr(a, "attn_backend", None)
    if a.adapter:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
    model.eval()
    print(f"loaded {a.model or 'gemma-3-270m'}{' + ' + a.adapter if a.adapter else ''} in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)

    pairs = encode_rollouts(records, model.config.vocab_size, model.config.max_position_embeddings,
                            lambda: load_tokenizer(a.model))
    ids = [obj.get("id") for _, obj in records]
    total_tokens = sum(len(c) for _, c in pairs)
    bar = tqdm(total=len(pairs), desc="scoring", unit="line", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty() and not a.progress)
    chunk = a.chunk_size or DEFAULT_CHUNK
    t1 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "w", encoding="utf-8")
    except OSError as e:  # name what the user gave, not the temp file beside it
        raise InputError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        with f, torch.inference_mode():
            for batch in pack_rollouts(pairs, a.batch_tokens):
                res = score(model, batch.input_ids.to(device), batch.cu_seqlens.to(device),
                            labels=batch.labels.to(device), temperature=a.temperature, return_entropy=True,
                            chunk_size=chunk)
                lp_all, ent_all = res.logprobs.cpu(), res.entropy.cpu()
                for span in batch.spans:
                    sl = RolloutBatch.completion_slice(span)
                    lp = lp_all[sl].double()
                    n = span[3]
                    rec = {} if ids[span[0]] is None else {"id": ids[span[0]]}
                    rec.update(logprobs=[float(x) for x in lp_all[sl].tolist()], logprob_sum=float(lp.sum()),
                               entropy_mean=float(ent_all[sl].double().mean()) if n else None, num_tokens=n)
                    f.write(json.dumps(rec) + "\n")
                bar.update(len(batch.spans))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    bar.close()
    dt = time.perf_counter() - t1
    print(f"scored {len(pairs)} lines ({total_tokens} completion tokens) in {dt:.2f}s -> {out}", file=sys.stderr)
    return 0
