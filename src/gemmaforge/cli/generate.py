"""``gemmaforge generate``: continue a prompt (or answer it as one chat turn), printing the text as it comes.

    gemmaforge generate --prompt TEXT | --prompt - | --prompt-file F  [--chat [--system TEXT]]
                        [--model M] [--adapter DIR] [--max-new-tokens N] [--temperature T]
                        [--top-k K] [--top-p P] [--seed S] [--jsonl]

``--prompt-file F`` holds one prompt per line (empty lines skipped); several prompts are generated
together (``inference.batch.generate_batch_ids``) and printed one after the other, each under a
``=== [i/n] line L ===`` header (``--jsonl``: one JSON object per prompt). A prompt that spans
lines comes from stdin: ``--prompt - < F``.

Also the pieces ``chat`` shares: the sampling flags (read here, so a bad value is one line naming the
flag and the value), the ``--device`` / ``--adapter`` checks made before the model loads, the loading,
and the stdout writer that streams text.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .common import add_model_args, check_adapter, check_device


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt (or answer it: --chat)",
                       description="Continue a prompt, printing the text as it is generated (special tokens "
                                   "left out); with --chat, answer it as one user turn of Gemma's chat format.")
    add_model_args(g)
    src = g.add_argument_group("prompt (exactly one)")
    src.add_argument("--prompt", default=None, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    src.add_argument("--prompt-file", default=None, metavar="FILE",
                     help="one prompt per line (UTF-8; empty lines skipped), generated together as one batch; "
                          "each output is printed under a '=== [i/n] line L ===' header (one prompt: just its "
                          "text). A prompt spanning several lines: --prompt - < FILE")
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: render it in the chat template, reply stops at <end_of_turn>")
    g.add_argument("--system", default=None, metavar="TEXT", help="a system prompt (implies --chat)")
    add_sampling_args(g, max_new_tokens=64)
    g.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per prompt: {\"line\", \"prompt\", \"completion\"} "
                        "(line: the prompt's line in --prompt-file, else 1)")
    g.add_argument("--progress", action="store_true",
                   help="show the progress bar on stderr (default: only when stderr is a tty and stdout is not)")
    g.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
    g.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image the prompt reads (repeatable; a multimodal model): one per <start_of_image> "
                        "in the prompt, else all of them before the prompt's text")
    g.set_defaults(func=cmd_generate)


# ----------------------------------------------------------------------------- shared with `chat`

SAMPLING_FLAGS = (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float), ("seed", int))


def add_sampling_args(p, max_new_tokens: int) -> None:
    """The sampling flags, read as text: ``sampling_from_args`` checks them (one line per bad value)."""
    p.add_argument("--max-new-tokens", default=str(max_new_tokens), metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens})")
    p.add_argument("--temperature", default="0", metavar="T", help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", default=None, metavar="K", help="sample among the K most likely tokens (K >= 1)")
    p.add_argument("--top-p", default=None, metavar="P",
                   help="sample within the smallest set of tokens holding probability P (0 < P <= 1)")
    p.add_argument("--seed", default=None, metavar="S", help="seed of the sampler (same seed, same text)")


def sampling_from_args(a) -> dict:
    """``{max_new_tokens, temperature, top_k, top_p, seed}`` from the flags; a nonsensical value
    raises ``InputError`` naming the flag and the value as typed (``--top-p 2: must be ...``)."""
    from ..errors import InputError
    from ..inference.generate import sampling_problem

    out = {}
    for name, kind in SAMPLING_FLAGS:
        raw = getattr(a, name)
        value = raw
        if raw is not None:
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                value = raw  # not a number: sampling_problem says what it must be
        why = sampling_problem(name, value)
        if why:
            raise InputError(f"--{name.replace('_', '-')} {raw}: {why}")
        out[name] = value
    if out["temperature"] == 0 and (out["top_k"] is not None or out["top_p"] is not None):
        print("gemmaforge: note: --top-k/--top-p only matter when sampling (--temperature > 0); "
              "this run is greedy", file=sys.stderr)
    return out


def load_model_and_tokenizer(a, dev: str):
    """``--model`` (+ ``--adapter``) on ``dev`` and its tokenizer; prints the load time on stderr."""
    from ..api import from_pretrained, load_tokenizer

    t0 = time.perf_counter()
    model = from_pretrained(a.model, dtype=a.dtype, device=dev, text_only=bool(getattr(a, "text_only", False)))
    model.attn_backend = a.attn_backend
    if a.adapter:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
    if getattr(a, "image", None):
        from ..api import load_processor
        from ..errors import InputError

        if not model.media_specs():
            raise InputError(f"--image given to a text-only model ({type(model).__name__}): use a multimodal "
                             "checkpoint (Gemma3ForConditionalGeneration)")
        tok = load_processor(a.model)
    else:
        tok = load_tokenizer(a.model)
    print(f"loaded {a.model or 'gemma-3-270m'}{' + ' + a.adapter if a.adapter else ''} on {dev} "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model, tok


class StdoutClosed(Exception):
    """stdout's reader went away (``... | head``): stop generating, leave quietly."""


class Out:
    """Writes streamed text to stdout at once (flushed); a character the terminal's encoding lacks
    comes out as '?', a closed pipe raises ``StdoutClosed``."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, text: str) -> None:
        if not text:
            return
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                enc = getattr(self.stream, "encoding", None) or "ascii"
                self.stream.write(text.encode(enc, errors="replace").decode(enc))
            self.stream.flush()
        except BrokenPipeError:
            try:  # no more output can go there; keep the interpreter's final flush from failing again
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            raise StdoutClosed() from None


# ----------------------------------------------------------------------------- the command

def read_prompts(a) -> list[tuple[int, str]]:
    """``(line number, prompt)`` of every prompt: one per non-empty line of ``--prompt-file F``, else
    ``read_prompt``'s one prompt (line 1)."""
    from ..errors import InputError

    if a.prompt_file is None:
        return [(1, read_prompt(a))]
    text = read_prompt(a, whole_file=True)
    where = f"--prompt-file {a.prompt_file}"
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        if a.chat and not line.strip():
            raise InputError(f"{where}: line {n}: empty chat message (only spaces)")
        out.append((n, line))
    if not out:
        raise InputError(f"{where}: empty prompt (no line holds text)")
    return out


def read_prompt(a, whole_file: bool = False) -> str:
    """The prompt from ``--prompt TEXT``, ``--prompt -`` (stdin) or ``--prompt-file F``. Text read from
    stdin or a file loses one trailing newline (files end with one; the prompt should not).
    ``whole_file``: a file's text may be empty or blank (``read_prompts`` checks its lines)."""
    from ..errors import InputError

    if a.prompt is not None and a.prompt_file is not None:
        raise InputError("give the prompt once: --prompt or --prompt-file, not both")
    if a.prompt is None and a.prompt_file is None:
        raise InputError("no prompt: give --prompt TEXT, --prompt - (read stdin) or --prompt-file FILE")
    if a.prompt_file is not None:
        where = f"--prompt-file {a.prompt_file}"
        try:
            data = Path(a.prompt_file).read_bytes()
        except OSError as e:
            raise InputError(f"{where}: {e.strerror or e}") from None
    elif a.prompt == "-":
        where = "--prompt - (stdin)"
        if sys.stdin is None:
            raise InputError(f"{where}: no stdin")
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        buf = getattr(sys.stdin, "buffer", None)
        data = buf.read() if buf is not None else sys.stdin.read()
    else:
        where, data = "--prompt", a.prompt
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if where != "--prompt":  # read from stdin or a file
        data = data.removeprefix("\ufeff")
        data = data[:-2] if data.endswith("\r\n") else data[:-1] if data.endswith("\n") else data
    empty = not data.strip() if a.chat else not data  # a chat turn is stripped; a prompt of spaces is text
    if empty and not (whole_file and a.prompt_file is not None):
        raise InputError(f"{where}: empty prompt")
    return data


def _messages(a, prompt: str, images=None) -> list[dict]:
    content = prompt
    if images:  # the images first, then the text, in one user turn
        content = [{"type": "image", "path": str(p)} for p in images] + [{"type": "text", "text": prompt}]
    return ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": content}]


def check_images(a, several: bool = False) -> None:
    """``--image`` files readable (before the model loads); one prompt only."""
    from ..data.images import check_image
    from ..errors import InputError

    for p in getattr(a, "image", None) or []:
        check_image(p)
    if getattr(a, "image", None) and several:
        raise InputError("--image applies to one prompt (not to --prompt-file with several lines or --jsonl)")


def _generate_many(a, model, tok, prompts: list[tuple[int, str]], sampling: dict) -> int:
    """Every prompt in one batch (``generate_batch_ids``); the outputs printed in the prompts' order
    once all are done, each under a header (or as JSON lines with ``--jsonl``)."""
    import json

    from tqdm import tqdm

    from ..inference.batch import decode_reply, generate_batch_ids
    from ..inference.chat import chat_prompt_ids
    from ..inference.generate import stop_ids_of

    if a.chat:
        ids = [chat_prompt_ids(tok, _messages(a, p)) for _, p in prompts]
    else:
        ids = [tok.encode(p) for _, p in prompts]
    ctx = model.config.max_position_embeddings
    for (line, _), row in zip(prompts, ids):
        if len(row) > ctx:
            from ..errors import InputError

            raise InputError(f"--prompt-file {a.prompt_file}: line {line}: prompt of {len(row)} tokens is longer "
                             f"than the model's context ({ctx})")
    bar = tqdm(total=sampling["max_new_tokens"] * len(ids), desc=f"generating {len(ids)} prompts", unit="tok",
               file=sys.stderr, leave=False,
               disable=not (a.progress or (sys.stderr.isatty() and not sys.stdout.isatty())))
    try:
        st = generate_batch_ids(model, ids, stop_ids=stop_ids_of(model, tok), return_stats=True,
                                on_step=lambda rows, _toks: bar.update(len(rows)), **sampling)
    finally:
        bar.close()
    out = Out()
    n = len(prompts)
    try:
        for i, ((line, prompt), new) in enumerate(zip(prompts, st.ids), 1):
            text = decode_reply(tok, new)
            if a.jsonl:
                out.write(json.dumps({"line": line, "prompt": prompt, "completion": text}, ensure_ascii=False) + "\n")
            else:
                out.write(f"=== [{i}/{n}] line {line} ===\n{text}\n")
    except StdoutClosed:
        return 0
    print(f"{n} prompts, {st.new_tokens} tokens in {st.prefill_s + st.decode_s:.2f}s ({st.tokens_per_s:.1f} "
          f"tokens/s; prompts {sum(st.prompt_tokens)} tokens prefilled in {st.prefill_s:.2f}s)", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    from ..inference.chat import chat
    from ..inference.generate import generate

    sampling = sampling_from_args(a)
    a.chat = a.chat or a.system is not None
    prompts = read_prompts(a)
    dev = check_device(a.device)
    check_adapter(a.adapter)
    check_images(a, several=len(prompts) > 1 or a.jsonl)
    model, tok = load_model_and_tokenizer(a, dev)
    if len(prompts) > 1 or a.jsonl:
        return _generate_many(a, model, tok, prompts, sampling)
    prompt = prompts[0][1]

    from tqdm import tqdm

    bar = tqdm(total=sampling["max_new_tokens"], desc="generating", unit="tok", file=sys.stderr, leave=False,
               disable=not (a.progress or (sys.stderr.isatty() and not sys.stdout.isatty())))
    out = Out()
    kw = dict(on_token=lambda _: bar.update(1), on_text=out.write, return_stats=True, **sampling)
    try:
        if a.chat:
            _, st = chat(model, tok, _messages(a, prompt, images=a.image), **kw)
        else:
            _, st = generate(model, tok, prompt, images=a.image, **kw)
        out.write("\n")
    except StdoutClosed:
        return 0
    finally:
        bar.close()
    print(f"{st.new_tokens} tokens in {st.decode_s:.2f}s ({st.tokens_per_s:.1f} tokens/s; prompt "
          f"{st.prompt_tokens} tokens prefilled in {st.prefill_s:.2f}s)", file=sys.stderr)
    return 0
