"""Thin command line: parse arguments, call the Python API, turn known errors into one line (exit 2)."""

from __future__ import annotations

import argparse
import json
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
    if a.adapter:
        from .transforms.lora import load_adapter

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


def cmd_merge(a) -> int:
    from .api import from_pretrained, load_tokenizer
    from .checkpoint.hf import save_hf
    from .transforms.lora import load_adapter, merged_copy

    model = from_pretrained(a.model)
    load_adapter(model, a.adapter)
    out = save_hf(merged_copy(model), a.out, tokenizer=load_tokenizer(a.model))
    print(f"wrote merged model to {out}", file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from .checkpoint.convert import convert

    t0 = time.perf_counter()
    out = convert(a.src, a.dst)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


_TRAIN_FLAGS = [
    # (flag, type, help)
    ("--data", "list", "training data: .txt files, directories of them, or .jsonl (text / prompt+completion / messages)"),
    ("--out", str, "run directory (default runs/<timestamp>)"),
    ("--steps", int, "optimizer steps"),
    ("--lr", float, "peak learning rate"),
    ("--min-lr-ratio", float, "final lr as a fraction of the peak"),
    ("--warmup-steps", int, "linear warm-up steps"),
    ("--schedule", str, "cosine | linear | constant"),
    ("--weight-decay", float, "AdamW weight decay (not on norms/biases/embeddings)"),
    ("--clip", float, "gradient clipping max norm (0 = off)"),
    ("--batch-tokens", int, "tokens per optimizer step (gradient accumulation over rows)"),
    ("--seq-len", int, "packed row length"),
    ("--micro-batch-rows", int,
     "rows per forward/backward (default 2); batch-tokens / (seq-len * this) micro-batches accumulate"),
    ("--seed", int, "random seed (data order, init)"),
    ("--val-fraction", float, "fraction of documents held out for validation"),
    ("--eval-every", int, "evaluate every N steps"),
    ("--eval-rows", int, "validation rows evaluated"),
    ("--save-every", int, "checkpoint every N steps"),
    ("--keep-last", int, "checkpoints kept"),
    ("--max-bad-steps", int, "stop after N consecutive non-finite steps"),
    ("--resume", str, "run dir or checkpoint dir to continue from"),
    ("--loss-chunk-size", int, "rows per chunk of the linear+cross-entropy"),
    ("--lora-rank", int, "train LoRA adapters of this rank instead of all weights"),
    ("--lora-alpha", float, "LoRA alpha (default: rank)"),
    ("--lora-dropout", float, "LoRA dropout"),
    ("--lora-targets", "list", "module names or regexes (default: the seven projections)"),
]


def cmd_train(a) -> int:
    from .train import TrainConfig, Trainer, load_recipe

    values = load_recipe(a.config) if a.config else {}
    for flag, _, _ in _TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        v = getattr(a, key)
        if v is not None:
            values[key] = v
    for key in ("model", "device", "attn_backend"):
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    if a.dtype != "float32":
        values["dtype"] = a.dtype
    if a.activation_checkpointing:
        values["activation_checkpointing"] = True
    if a.no_progress:
        values["progress"] = False
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: one process per rank
        return _train_distributed(a, values, world)
    if (a.dp_shard, a.cp, a.tp, a.pp, a.ep) != (-1, 1, 1, 1, 1):  # a layout that needs torchrun: one clear line
        from .transforms.parallel import LayoutError, ParallelDims

        d = ParallelDims(a.dp_shard, a.cp, a.tp, a.pp, a.ep)
        n = (max(d.dp_shard, 1) if d.dp_shard != -1 else max(d.ep, 1)) * d.cp * d.tp * d.pp
        d.validate(n)  # bad values first
        if n > 1:
            raise LayoutError(f"parallel layout {d.resolved(n).describe()} needs {n} processes: run it under "
                              f"torchrun --nproc-per-node {n} -m gemmaforge train ...")
    trainer = Trainer(TrainConfig(**values))
    if a.compile:
        from .transforms.parallel import compile_blocks

        compile_blocks(trainer.model)
    summary = trainer.run()
    print(json.dumps(summary))
    return int(summary.get("exit_code", 0))


def _train_distributed(a, values: dict, world: int) -> int:
    """``train`` under torchrun with ``--dp-shard/--tp/--cp/--pp/--ep``. A wrong layout is the same error on
    every rank: rank 0 alone prints its one line (every rank exits with code 2)."""
    import os

    from .train import TrainConfig
    from .transforms.parallel import LayoutError, ParallelConfig, ParallelDims, pipeline_schedule_name

    try:
        dims = ParallelDims(a.dp_shard, a.cp, a.tp, a.pp, a.ep)
        dims.validate(world)  # the world size alone: fails before the process group or the model
        pcfg = ParallelConfig(activation_checkpointing=a.activation_checkpointing, compile=a.compile,
                              pp_schedule=pipeline_schedule_name(a.pp_schedule))
        from .distributed import is_rank0, make_distributed_trainer

        summary = make_distributed_trainer(TrainConfig(**values), dims=dims, pcfg=pcfg).run()
    except LayoutError:
        if int(os.environ.get("RANK", "0")) != 0:
            return 2
        raise
    if not is_rank0():
        return int(summary.get("exit_code", 0))
    print(json.dumps(summary))
    return int(summary.get("exit_code", 0))


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
    g.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) applied on top of --model")
    g.set_defaults(func=cmd_generate)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into the base weights and write an HF dir")
    mg.add_argument("--model", default=None, help="base model (HF dir, .gguf or preset; default gemma-3-270m)")
    mg.add_argument("--adapter", required=True, help="LoRA adapter dir (PEFT format)")
    mg.add_argument("--out", required=True, help="output HF-format dir")
    mg.set_defaults(func=cmd_merge)

    c = sub.add_parser("convert", help="GGUF file or HF dir -> HF-format dir")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="continued pretraining / fine-tuning (default: the embedded 270M on "
                                     "CPython's language reference)")
    _add_model(t)
    t.set_defaults(dtype="float32")
    t.add_argument("--config", default=None, help="recipe.toml whose keys mirror these flags (flags override)")
    for flag, typ, help_ in _TRAIN_FLAGS:
        if typ == "list":
            t.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            t.add_argument(flag, type=typ, default=None, help=help_)
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dp-shard", type=int, default=-1, help="FSDP2 shards (-1: world / (cp*tp*pp))")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    t.add_argument("--cp", type=int, default=1, help="context-parallel ranks (shard each row)")
    t.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE models; borrowed from --dp-shard, "
                   "which it must divide; experts are split over them)")
    t.add_argument("--pp", type=int, default=1, help="pipeline stages (decoder layers split evenly; "
                                                     "each row of a step is one micro-batch)")
    t.add_argument("--pp-schedule", default="1f1b", type=str.lower, choices=["gpipe", "1f1b"],
                   help="pipeline schedule (1f1b needs at least --pp rows per step per pipeline)")
    t.add_argument("--compile", action="store_true", help="torch.compile each block")
    t.set_defaults(func=cmd_train)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommands that live next to their feature (each module has ``register(subparsers)``)."""
    from . import inspect_cli, score_cli

    return [inspect_cli.register, score_cli.register]


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
