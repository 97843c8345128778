"""Thin command line: parse arguments, call the Python API, turn known errors into one line (exit 2)."""

from __future__ import annotations

import argparse
import sys
import time


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF dir, .gguf file or preset name (default: the embedded gemma-3-270m)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU default) or bfloat16 (GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--attn-backend", default=None, choices=["auto", "eager", "sdpa", "flex", "flash"])


def _device(arg):
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(a) -> int:
    from .api import from_pretrained, load_tokenizer
    from .generate import generate

    t0 = time.perf_counter()
    model = from_pretrained(a.model, dtype=a.dtype, device=_device(a.device))
    model.attn_backend = a.attn_backend
    tok = load_tokenizer(a.model)
    print(f"loaded {a.model or 'gemma-3-270m'} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(total=a.max_new_tokens, desc="generating", unit="tok", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty() and not a.progress)
    text, st = generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                        top_k=a.top_k, top_p=a.top_p, seed=a.seed, on_token=lambda _: bar.update(1),
                        return_stats=True)
    bar.close()
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    print(f"{st.new_tokens} tokens in {st.decode_s:.2f}s ({st.tokens_per_s:.1f} tokens/s; prompt "
          f"{st.prompt_tokens} tokens prefilled in {st.prefill_s:.2f}s)", file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from .checkpoint.convert import convert

    t0 = time.perf_counter()
    out = convert(a.src, a.dst)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmaforge", description="Train, fine-tune and look inside Gemma models.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    _add_model(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="GGUF file or HF dir -> HF-format dir")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=cmd_convert)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


# other modules (train, score, inspect, lora) add their subcommands here
_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    from .errors import GemmaforgeError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
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
