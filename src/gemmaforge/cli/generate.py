"""``gemmaforge generate``: continue a prompt (or answer it as one chat turn), printing the text as it comes.

    gemmaforge generate --prompt TEXT | --prompt - | --prompt-file F  [--chat [--system TEXT]]
                        [--model M] [--adapter DIR] [--max-new-tokens N] [--temperature T]
                        [--top-k K] [--top-p P] [--seed S]

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
    src.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE (UTF-8)")
    g.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: render it in the chat template, reply stops at <end_of_turn>")
    g.add_argument("--system", default=None, metavar="TEXT", help="a system prompt (implies --chat)")
    add_sampling_args(g, max_new_tokens=64)
    g.add_argument("--progress", action="store_true",
                   help="show the progress bar on stderr (default: only when stderr is a tty and stdout is not)")
    g.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
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
    model = from_pretrained(a.model, dtype=a.dtype, device=dev)
    model.attn_backend = a.attn_backend
    if a.adapter:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
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

def read_prompt(a) -> str:
    """The prompt from ``--prompt TEXT``, ``--prompt -`` (stdin) or ``--prompt-file F``. Text read from
    stdin or a file loses one trailing newline (files end with one; the prompt should not)."""
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
    if empty:
        raise InputError(f"{where}: empty prompt")
    return data


def cmd_generate(a) -> int:
    from ..inference.chat import chat
    from ..inference.generate import generate

    sampling = sampling_from_args(a)
    a.chat = a.chat or a.system is not None
    prompt = read_prompt(a)
    dev = check_device(a.device)
    check_adapter(a.adapter)
    model, tok = load_model_and_tokenizer(a, dev)

    from tqdm import tqdm

    bar = tqdm(total=sampling["max_new_tokens"], desc="generating", unit="tok", file=sys.stderr, leave=False,
               disable=not (a.progress or (sys.stderr.isatty() and not sys.stdout.isatty())))
    out = Out()
    kw = dict(on_token=lambda _: bar.update(1), on_text=out.write, return_stats=True, **sampling)
    try:
        if a.chat:
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                [{"role": "user", "content": prompt}]
            _, st = chat(model, tok, messages, **kw)
        else:
            _, st = generate(model, tok, prompt, **kw)
        out.write("\n")
    except StdoutClosed:
        return 0
    finally:
        bar.close()
    print(f"{st.new_tokens} tokens in {st.decode_s:.2f}s ({st.tokens_per_s:.1f} tokens/s; prompt "
          f"{st.prompt_tokens} tokens prefilled in {st.prefill_s:.2f}s)", file=sys.stderr)
    return 0
