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

``register(subparsers)`` adds the subcommand; cli.py calls it through ``_EXTRA_COMMANDS``.
Importing this module has no side effects (torch is imported when the command runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``score`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "score", help="per-token log-probs of completions (JSONL in, JSONL out)",
        description="Score {\"prompt\", \"completion\"} (or {\"prompt_ids\", \"completion_ids\"}) JSONL lines: "
                    "writes one line per input with the completion's per-token log-probs, their sum, the "
                    "mean entropy and the token count.")
    from .cli import _add_model  # the same --model/--dtype/--device/--attn-backend as every command

    _add_model(p)
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


# --------------------------------------------------------------------------- reading


def _type_name(x) -> str:
    return "null" if x is None else type(x).__name__


def parse_rollouts(path) -> list[tuple[str, dict]]:
    """``(file:line, object)`` for every non-blank line of a JSONL file, with the fields checked.

    Every problem raises a one-line ``DataError`` naming ``file:line``. Needs no model, so a bad
    file fails before the model is loaded.
    """
    from .errors import DataError

    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    records = []
    with f:
        for line, raw in enumerate(f, 1):
            where = f"{path}:{line}"
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None
            if line == 1:
                s = s.removeprefix("\ufeff")
            if not s.strip():
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
            text = "prompt" in obj or "completion" in obj
            ids = "prompt_ids" in obj or "completion_ids" in obj
            if text and ids:
                raise DataError(f'{where}: ambiguous line: has both "prompt"/"completion" and '
                                f'"prompt_ids"/"completion_ids"')
            if not (text or ids):
                keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                raise DataError(f'{where}: expected "prompt"+"completion" or "prompt_ids"+"completion_ids"; '
                                f"got keys {keys}")
            for key in ("prompt", "completion") if text else ("prompt_ids", "completion_ids"):
                if key not in obj:
                    raise DataError(f'{where}: line lacks "{key}"')
                v = obj[key]
                if text and not isinstance(v, str):
                    raise DataError(f'{where}: "{key}" must be a string, got {_type_name(v)}')
                if not text and (not isinstance(v, list)
                                 or not all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
                    raise DataError(f'{where}: "{key}" must be a list of integers, got {_type_name(v)}')
            if ids and not obj["prompt_ids"]:
                raise DataError(f'{where}: "prompt_ids" is empty (the first completion token needs a context; '
                                f"start with BOS)")
            records.append((where, obj))
    if not records:
        raise DataError(f"{path}:1: empty file (no JSON lines)")
    return records


def encode_rollouts(records, vocab: int, max_len: int, get_tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, completion_ids)`` of parsed lines: text is tokenized (prompt with BOS,
    completion without, nothing appended; ``get_tokenizer()`` is called once, only if needed),
    ids are range-checked. Problems raise ``DataError`` naming ``file:line``."""
    from .errors import DataError

    pairs = []
    tok = None
    for where, obj in records:
        if "prompt" in obj:
            if tok is None:
                tok = get_tokenizer()
            p = list(tok.encode(obj["prompt"], add_bos=True))
            c = list(tok.encode(obj["completion"], add_bos=False))
        else:
            p, c = obj["prompt_ids"], obj["completion_ids"]
            for key, v in (("prompt_ids", p), ("completion_ids", c)):
                bad = [t for t in v if not 0 <= t < vocab]
                if bad:
                    raise DataError(f'{where}: "{key}" has token id {bad[0]} outside the vocabulary '
                                    f"(0..{vocab - 1})")
        if len(p) + len(c) > max_len:
            raise DataError(f"{where}: prompt + completion are {len(p) + len(c)} tokens, longer than the "
                            f"model's context ({max_len})")
        pairs.append((p, c))
    return pairs


# --------------------------------------------------------------------------- command


def cmd_score(a) -> int:
    from .errors import InputError

    if a.batch_tokens is None or a.batch_tokens < 1:
        raise InputError(f"--batch-tokens must be at least 1; got {a.batch_tokens}")
    if not a.temperature > 0:
        raise InputError(f"--temperature must be positive; got {a.temperature}")
    if a.chunk_size is not None and a.chunk_size < 1:
        raise InputError(f"--chunk-size must be at least 1; got {a.chunk_size}")
    out = Path(a.out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory")

    import torch
    from tqdm import tqdm

    from .api import from_pretrained, load_tokenizer
    from .score import DEFAULT_CHUNK, RolloutBatch, pack_rollouts, score

    records = parse_rollouts(a.data)  # a malformed file fails before the model is loaded
    t0 = time.perf_counter()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(a.model, dtype=a.dtype, device=device)
    model.attn_backend = getattr(a, "attn_backend", None)
    if a.adapter:
        from .transforms.lora import load_adapter

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f, torch.inference_mode():
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
