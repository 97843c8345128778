"""Thin command line: parse arguments, call the Python API, turn known errors into one line (exit 2)."""

from __future__ import annotations

import argparse
import sys

from . import chat, convert, eval, export_gguf, generate, inspect, merge, score, train
from . import dpo, grpo

# each module: register(subparsers)
COMMANDS = (generate, chat, merge, convert, train, eval, inspect, score, export_gguf)
COMMANDS += (dpo, grpo)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default (none for flags whose default is unset or False)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gemmaforge", description="Train, fine-tune and look inside Gemma models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks (also after the command)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import GemmaforgeError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = ["--debug"] * debug + [x for x in argv if x != "--debug"]  # after the command too
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except GemmaforgeError as e:
        if debug:
            raise
        print(f"gemmaforge: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if debug:
            raise
        print(f"gemmaforge: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemmaforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
