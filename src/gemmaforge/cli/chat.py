"""``gemmaforge chat``: an interactive multi-turn chat over Gemma's chat template, replies streamed.

    gemmaforge chat [--model M] [--adapter DIR] [--system TEXT] [--max-new-tokens N]
                    [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stats]

Each line read from stdin is one user message; the reply is printed on stdout as it is generated
(special tokens left out), then a newline. ``/reset`` forgets the conversation (the system prompt
stays), ``/exit`` (or Ctrl-D, or the end of piped input) ends, ``/help`` lists the commands. On a
terminal: a ``> `` prompt, line editing, a blank line after each reply, and Ctrl-C stops the reply
being generated (that turn is dropped from the history). Piped (``printf 'Hi\\nMore\\n' | gemmaforge
chat``): just the replies, one after the other, each ending with a newline.
"""

from __future__ import annotations

import importlib
import re
import sys

from .common import add_model_args, check_adapter, check_device
from .generate import (Out, StdoutClosed, add_sampling_args,
                       load_model_and_tokenizer, sampling_from_args, check_images)

COMMANDS_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) ends, /help shows this"
_COMMAND = re.compile(r"/[A-Za-z]+")


def register(sub) -> None:
    c = sub.add_parser("chat", help="chat with the model (multi-turn, streamed)",
                       description="An interactive chat: each stdin line is a user message, the reply streams to "
                                   "stdout. " + COMMANDS_HELP + ".")
    add_model_args(c)
    c.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system prompt (Gemma folds it into the first "
                                                                  "user turn)")
    add_sampling_args(c, max_new_tokens=256)
    c.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image the conversation is about (repeatable; a multimodal model): given with the first "
                        "user message")
    c.add_argument("--stats", action="store_true", help="after each reply, its token count and speed on stderr")
    c.set_defaults(func=cmd_chat)


def _read_line(interactive: bool) -> str | None:
    """The next line of input without its newline; None at the end of input (Ctrl-D / EOF)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    return line[:-1] if line.endswith("\n") else line


def cmd_chat(a) -> int:
    from ..errors import InputError
    from ..inference.chat import Conversation

    sampling = sampling_from_args(a)
    dev = check_device(a.device)
    check_adapter(a.adapter)
    if sys.stdin is None:
        raise InputError("chat: no stdin to read messages from")
    check_images(a)
    model, tok = load_model_and_tokenizer(a, dev)
    seed = sampling.pop("seed")
    conv = Conversation(model, tok, system=a.system or None, seed=seed, images=a.image, **sampling)

    interactive = sys.stdin.isatty()
    if interactive:
        try:  # line editing and history for input()
            importlib.import_module("readline")
        except ImportError:
            pass
        print(f"chatting ({COMMANDS_HELP})", file=sys.stderr)
    out = Out()
    failed = False
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt (Ctrl-D ends)
            print(file=sys.stderr)
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if _COMMAND.fullmatch(text):
            cmd = text.lower()
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd in ("/reset", "/clear"):
                conv.reset()
                print("(conversation reset)", file=sys.stderr)
            elif cmd in ("/help", "/?"):
                print(COMMANDS_HELP, file=sys.stderr)
            else:
                print(f"unknown command {text} ({COMMANDS_HELP})", file=sys.stderr)
            continue
        try:
            conv.send(line, on_text=out.write)
            out.write("\n\n" if interactive else "\n")
        except StdoutClosed:
            return 0
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(interrupted: this turn is dropped)", file=sys.stderr)
            continue
        except InputError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            print(f"\ngemmaforge: error: {e}", file=sys.stderr)
            failed = True
            continue
        if a.stats:
            st = conv.stats
            print(f"[{st.new_tokens} tokens in {st.decode_s:.2f}s ({st.tokens_per_s:.1f} tokens/s); prompt "
                  f"{st.prompt_tokens} tokens prefilled in {st.prefill_s:.2f}s]", file=sys.stderr)
    return 2 if failed else 0
