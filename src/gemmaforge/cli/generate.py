"""``gemmaforge generate``: continue a prompt."""

from __future__ import annotations

import sys
import time

from .common import add_model_args, device


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a tty")
    g.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
    g.set_defaults(func=cmd_generate)


def cmd_generate(a) -> int:
    from ..api import from_pretrained, load_tokenizer
    from ..inference.generate import generate

    t0 = time.perf_counter()
    model = from_pretrained(a.model, dtype=a.dtype, device=device(a.device))
    model.attn_backend = a.attn_backend
    if a.adapter:
        from ..formats.peft import load_adapter

        load_adapter(model, a.adapter)
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
