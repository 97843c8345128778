"""Thin command line: parse arguments, call the Python API, turn known errors into one line (exit 2)."""

from __future__ import annotations

import argparse
import sys

from . import chat, convert, eval, export_gguf, generate, inspect, merge, score, train

COMMANDS = (generate, chat, merge, convert, train, eval, inspect, score, export_gguf)  # each module: register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmaforge", description="Train, fine-tune and look inside Gemma models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
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
