"""``gemmaforge train``: continued pretraining / fine-tuning, in one process or under torchrun with a
parallel layout (``--dp-shard/--tp/--cp/--pp/--ep``); the same ``Trainer`` either way."""

from __future__ import annotations

import argparse
import json
import os

from .common import add_model_args, check_device

_TRAIN_FLAGS = [
    # (flag, type, help)
    ("--data", "list", "training data: .txt files, directories of them, or .jsonl (text / prompt+completion / messages)"),
    ("--out", str, "run directory (default runs/<timestamp>)"),
    ("--steps", int, "optimizer steps (default 16)"),
    ("--epochs", float, "instead of --steps: passes over the packed training rows (steps rounded up)"),
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
    ("--val-data", "list", "validation data of one's own (same formats as --data): every document of it is "
                           "evaluated and all of --data trains (no split; --val-fraction, --eval-rows ignored)"),
    ("--eval-every", int, "evaluate every N steps"),
    ("--eval-rows", int, "validation rows evaluated"),
    ("--save-every", int, "checkpoint every N steps (default 8); 0: no checkpoint at all, the final export only "
                          "(such a run cannot be resumed)"),
    ("--keep-last", int, "checkpoints a finished run keeps, its last step's included (default 0: the newest is "
                         "kept while the run goes, to resume it if interrupted, and removed once final/ is written)"),
    ("--max-bad-steps", int, "stop after N consecutive non-finite steps"),
    ("--loss-chunk-size", int, "rows per chunk of the linear+cross-entropy"),
    ("--lora-rank", int, "train LoRA adapters of this rank instead of all weights"),
    ("--lora-alpha", float, "LoRA alpha (default: rank)"),
    ("--lora-dropout", float, "LoRA dropout"),
    ("--lora-targets", "list", "module names or regexes (default: the seven projections)"),
    ("--save-dtype", str, "dtype of the exports final/ and adapter/: fp32 (default) or bf16 (checkpoints stay "
                          "exact fp32)"),
    ("--max-shard-size", str, "final/ as several safetensors files above this size (default 5GB; e.g. 500MB, 2GiB)"),
    ("--log", "list", "also log the metrics to: tensorboard (event files in RUN/tensorboard), wandb (RUN/wandb; "
                      "offline without an API key or with WANDB_MODE=offline)"),
    ("--log-every", int, "steps per plain log line when no progress bar shows (default: about 50 lines a run)"),
]
_BARE = object()  # --resume without a value



def _config_defaults() -> dict:
    """TrainConfig's field defaults (what a flag left out means), for --help."""
    import dataclasses

    from ..train.config import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def register(sub) -> None:
    t = sub.add_parser("train", help="continued pretraining / fine-tuning (default: the embedded 270M on "
                                     "CPython's language reference)")
    add_training_args(t)
    t.set_defaults(func=cmd_train)


def add_training_args(t, layouts: bool = True) -> None:
    """The model flags, every training flag and the parallel-layout flags (``layouts``: CP and PP too):
    ``gemmaforge train``'s, which ``dpo`` and ``grpo`` share."""
    add_model_args(t)
    t.set_defaults(dtype=None)  # train's --dtype: auto (default), float32/fp32, bfloat16/bf16
    for action in t._actions:
        if "--dtype" in action.option_strings:
            action.help = ("auto (default): bf16 autocast with fp32 master weights, norms, softmax and loss on CUDA "
                           "and on a CPU that multiplies bf16 natively (AMX / AVX512-BF16), fp32 elsewhere; "
                           "float32 or bfloat16 force it (the choice is printed and saved in metrics.jsonl)")
    t.add_argument("--config", default=None, help="recipe.toml whose keys mirror these flags (flags override); "
                                                  "a run dir stands for its recipe.toml")
    defaults = _config_defaults()
    for flag, typ, help_ in _TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        if "default" not in help_ and defaults.get(key) not in (None, [], ""):
            help_ = f"{help_} (default: {defaults[key]})"
        if typ == "list":
            t.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            t.add_argument(flag, type=typ, default=None, help=help_)
    t.add_argument("--resume", nargs="?", const=_BARE, default=None, metavar="DIR",
                   help="continue a run (its dir, or one checkpoint dir) with its own settings (flags given again "
                        "override; --steps may grow); without DIR: --out's run")
    t.add_argument("--no-merge", action="store_true", default=None,
                   help="LoRA: write adapter/ only, no merged final/")
    t.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block in backward")
    t.add_argument("--train-vision", action="store_true", default=None,
                   help="multimodal models: train the vision tower and projector too (default: frozen, no "
                        "optimizer state); with --lora-rank: targets may name their linear layers")
    t.add_argument("--train-audio", action="store_true", default=None,
                   help="multimodal models: train the audio tower and its embedder too (default: frozen)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; otherwise, and with --no-progress, one "
                        "plain line per logging interval)")
    t.add_argument("--dp-shard", type=int, default=-1, help="FSDP2 shards (-1: world / (cp*tp*pp))")
    t.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    if not layouts:
        t.set_defaults(cp=1, pp=1, ep=1, pp_schedule="1f1b", compile=False)
        return
    t.add_argument("--cp", type=int, default=1, help="context-parallel ranks (shard each row)")
    t.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (MoE models; borrowed from --dp-shard, "
                   "which it must divide; experts are split over them)")
    t.add_argument("--pp", type=int, default=1, help="pipeline stages (decoder layers split evenly; "
                                                     "each row of a step is one micro-batch)")
    t.add_argument("--pp-schedule", default="1f1b", type=str.lower, choices=["gpipe", "1f1b"],
                   help="pipeline schedule (1f1b needs at least --pp rows per step per pipeline)")
    t.add_argument("--compile", action="store_true", help="torch.compile each block")


def _values(a) -> dict:
    """The run's settings: a resumed run's own (its recipe.toml), then --config's, then the flags given."""
    from ..errors import ConfigError
    from ..train.config import load_recipe, merge_settings, run_settings

    flags = {}
    for flag, _, _ in _TRAIN_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(a, key) is not None:
            flags[key] = getattr(a, key)
    for key in ("model", "device", "attn_backend", "dtype", "activation_checkpointing", "no_merge", "progress",
                "train_vision", "train_audio", "text_only"):
        if getattr(a, key) is not None:
            flags[key] = getattr(a, key)
    own = {}
    if a.resume is _BARE:
        if "out" not in flags:
            raise ConfigError("--resume without a path continues --out's run: give --out RUN_DIR (or --resume RUN_DIR)")
        a.resume = flags["out"]
    if a.resume is not None:
        flags["resume"] = a.resume
        own = run_settings(a.resume)
    return merge_settings(own, load_recipe(a.config) if a.config else {}, flags)


def cmd_train(a) -> int:
    return run_training(a)


def run_training(a, task=None, before=None) -> int:
    """``gemmaforge train`` (``task`` None) or a task's command (dpo, grpo): the Trainer at the flags'
    layout. ``before()``: the task's own checks, run before any data or model loads. A wrong layout is
    the same error on every rank: rank 0 alone prints its one line (every rank exits with code 2)."""
    from ..parallel.dims import LayoutError, ParallelConfig, ParallelDims, pipeline_schedule_name
    from ..parallel.process import is_rank0
    from ..train.config import TrainConfig
    from ..train.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.device is not None:
        check_device(a.device)  # before any data or model loads
    try:
        dims = ParallelDims(a.dp_shard, a.cp, a.tp, a.pp, a.ep)
        if world == 1:
            n = (max(dims.dp_shard, 1) if dims.dp_shard != -1 else max(dims.ep, 1)) * dims.cp * dims.tp * dims.pp
            dims.validate(n)  # bad values first
            if n > 1:  # a layout that needs torchrun: one clear line
                raise LayoutError(f"parallel layout {dims.resolved(n).describe()} needs {n} processes: run it "
                                  f"under torchrun --nproc-per-node {n} -m gemmaforge train ...")
            dims = None
        else:
            dims.validate(world)  # the world size alone: fails before the process group or the model
        if before is not None:
            task = before()
        values = _values(a)
        pcfg = ParallelConfig(activation_checkpointing=bool(values.get("activation_checkpointing")),
                              compile=a.compile, pp_schedule=pipeline_schedule_name(a.pp_schedule))
        summary = Trainer(TrainConfig(**values), dims=dims, parallel=pcfg, task=task).run()
    except LayoutError:
        if int(os.environ.get("RANK", "0")) != 0:
            return 2
        raise
    if is_rank0():
        print(json.dumps(summary))
    return int(summary.get("exit_code", 0))
