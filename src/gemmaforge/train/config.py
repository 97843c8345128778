"""The training run's settings (``TrainConfig``, mirrored by ``gemmaforge train``'s flags) and recipes.

A recipe is a TOML file whose keys mirror the flags (``seq-len = 128`` or ``seq_len = 128``). Every run
writes its resolved settings as ``recipe.toml`` in its run directory: ``--config RUN/recipe.toml`` (or
``--config RUN``) starts a new run with them, ``--resume RUN`` continues that run with them (flags given
again override). Values are type-checked: a wrong type is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16")
SAVE_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
LOGGERS = ("tensorboard", "wandb")
RECIPE = "recipe.toml"
# a run's own settings that are not part of its recipe: where it writes, what it continues from, how it shows
NOT_IN_RECIPE = ("out", "resume", "progress")


@dataclass
class TrainConfig:
    model: str | None = None  # HF dir, .gguf, or preset name; None = embedded gemma-3-270m
    data: list[str] = field(default_factory=list)  # .txt / dir / .jsonl; empty = CPython's language reference
    val_data: list[str] = field(default_factory=list)  # validation files of one's own (same formats): all of
    # their documents validate, all of `data` trains (val_fraction and eval_rows do not apply); empty = the split
    out: str | None = None  # default runs/<timestamp>
    steps: int = 16
    epochs: float | None = None  # instead of steps: passes over the packed training rows (steps = ceil)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    decay_norms_and_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    seq_len: int = 256
    batch_tokens: int = 512  # tokens per optimizer step (rows * seq_len); grad accumulation over rows
    micro_batch_rows: int = 2  # rows per forward (at most; a divisor of the step's rows): the default 512-token
    # step in one forward (a second micro-batch would hold a second [V, H] head gradient: 270M, 5.31 vs 4.66 GiB
    # peak and slower)
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 8
    eval_rows: int = 4
    save_every: int = 8  # 0: no checkpoint at all (the final export only; such a run cannot be resumed)
    keep_last: int = 0  # checkpoints a finished run keeps (its last step included). 0: checkpoints are only
    # there to resume an interrupted run: the newest is kept while the run goes, and removed once final/ is
    # written (the 270M's full checkpoint is 3.2 GB: model + AdamW moments, fp32)
    max_bad_steps: int = 3
    activation_checkpointing: bool = False
    text_only: bool = False  # a multimodal checkpoint's text decoder alone (towers not loaded)
    train_vision: bool = False  # multimodal models: train the vision tower and projector too (frozen by default)
    train_audio: bool = False  # multimodal models: train the audio tower and its embedder too (frozen by default)
    dtype: str = "auto"  # auto: bf16 autocast on CUDA and on a CPU with native bf16, fp32 elsewhere; float32/fp32, bfloat16/bf16
    device: str | None = None
    attn_backend: str | None = None
    loss_chunk_size: int = 128  # tokens per LM-head chunk beyond the first min(T, hidden) (those use the
    # weight-gradient buffer): a [chunk, vocab] fp32 buffer, 128 MiB at 262k vocab, kept from step to step
    # (HeadGradBuffer.logits); a frozen head (LoRA) always uses it. 256 was as fast and peaked 0.12 GiB higher.
    resume: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    no_merge: bool = False  # LoRA: write adapter/ only, no merged final/
    save_dtype: str = "fp32"  # dtype of the exports (final/, adapter/): fp32 | bf16; checkpoints stay exact
    max_shard_size: str | int = "5GB"  # final/ is split into model-0000N-of-0000M.safetensors above this size
    log: list[str] = field(default_factory=list)  # tensorboard, wandb (besides metrics.jsonl and stderr)
    log_every: int = 0  # steps per plain log line (no progress bar); 0: about 50 lines a run, at least 1 step
    progress: bool | None = None  # progress bar; None: when stderr is a terminal (else plain lines)

    @property
    def rows_per_step(self) -> int:
        return max(1, self.batch_tokens // self.seq_len)

    @property
    def rows_per_micro_batch(self) -> int:
        """The largest divisor of the step's rows (``batch_tokens // seq_len``) not above ``micro_batch_rows``:
        every micro-batch of a step has as many rows, and a step never takes more rows than it holds."""
        rows = self.rows_per_step
        return max(d for d in range(1, max(1, min(self.micro_batch_rows, rows)) + 1) if rows % d == 0)

    @property
    def accum(self) -> int:
        return self.rows_per_step // self.rows_per_micro_batch

    @property
    def resolved_log_every(self) -> int:
        return self.log_every or max(1, round(self.steps / 50))

    def validate(self) -> None:
        for k, v in check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "").items():
            setattr(self, k, v)
        for name in ("steps", "seq_len", "batch_tokens", "micro_batch_rows", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive (got {getattr(self, name)})")
        for name in ("keep_last", "save_every", "eval_every", "eval_rows", "log_every", "warmup_steps", "lora_rank",
                     "loss_chunk_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be 0 or more (got {getattr(self, name)})")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be positive (got {self.epochs})")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2 (a row of one token predicts nothing); got {self.seq_len}")
        if self.batch_tokens < self.seq_len:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} is less than one row (--seq-len {self.seq_len}): "
                              f"a step is whole rows")
        if self.batch_tokens % self.seq_len:
            lo = self.batch_tokens // self.seq_len * self.seq_len
            raise ConfigError(f"--batch-tokens {self.batch_tokens} is not a multiple of --seq-len {self.seq_len} (a "
                              f"step is whole rows): use {lo} or {lo + self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--schedule must be cosine, linear or constant (got {self.schedule!r})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: use auto, float32 (fp32) or bfloat16 (bf16)")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"--save-dtype {self.save_dtype}: use fp32 or bf16")
        for name in self.log:
            if name not in LOGGERS:
                raise ConfigError(f"--log {name}: use {' and/or '.join(LOGGERS)} (metrics.jsonl is always written)")
        if self.no_merge and not self.lora_rank:
            raise ConfigError("--no-merge skips the merged final/ of a LoRA run: it needs --lora-rank")
        shard_bytes(self.max_shard_size)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ----------------------------------------------------------------------------- types

def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _describe(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return "a list of strings"
    if args and len(args) > 1:
        return " or ".join(_describe(a) for a in args)
    tp = args[0] if args else tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp, v):
    """``v`` as a value of type ``tp`` (int -> float where a number is expected; a lone string -> a list
    of one), or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(v, str):
            return [v]
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            return list(v)
        raise TypeError
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v)
            except TypeError:
                pass
        raise TypeError
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise TypeError
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise TypeError
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise TypeError
    if tp is str:
        if isinstance(v, str):
            return v
        raise TypeError
    return v


def check_types(values: dict, where: str) -> dict:
    """``values`` (TrainConfig keys) type-checked and normalised; one-line ConfigError naming ``where``
    (e.g. ``"recipe.toml: "``) and the key."""
    hints = _hints()
    out = {}
    for k, v in values.items():
        try:
            out[k] = _coerce(hints[k], v)
        except TypeError:
            shown = json.dumps(v) if isinstance(v, (str, int, float, bool, list)) else repr(v)
            name = f"{where}{k}" if where else f"--{_flag(k)}"
            raise ConfigError(f"{name} must be {_describe(hints[k])} (got {shown})") from None
    return out


def shard_bytes(size) -> int:
    """``max_shard_size`` in bytes: an integer, or ``"500MB"``, ``"5GB"`` (powers of 1000), ``"2GiB"``
    (powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise ConfigError(f"--max-shard-size {size}: use a size such as 500MB, 5GB or 2GiB")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if n <= 0:
        raise ConfigError(f"--max-shard-size {size}: must be positive")
    return n


# ----------------------------------------------------------------------------- recipes

def _loads_toml(text: str):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text), tomllib.TOMLDecodeError


def recipe_path(path: str | Path) -> Path:
    """A recipe file; a run directory stands for its ``recipe.toml`` (or an older run's ``config.json``)."""
    p = Path(path)
    if p.is_dir():
        for name in (RECIPE, "config.json"):
            if (p / name).is_file():
                return p / name
        raise ConfigError(f"{p}: a directory without {RECIPE} (not a gemmaforge run directory)")
    return p


def load_recipe(path: str | Path) -> dict:
    """A recipe's settings (keys mirror the flags, dashes or underscores), type-checked. ``path``: a
    ``.toml`` file, an older run's ``config.json`` (its ``out`` and ``resume`` are that run's own and are
    dropped), or a run directory."""
    p = recipe_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: not a JSON object of settings")
        d = {k: v for k, v in d.items() if v is not None and k not in ("out", "resume")}
    else:
        try:
            d, _ = _loads_toml(text)
        except Exception as e:  # tomllib.TOMLDecodeError
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    out = {}
    known = TrainConfig.field_names()
    for k, v in d.items():
        key = k.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{p}: unknown key {k!r}")
        out[key] = v
    if "steps" in out and "epochs" in out:
        raise ConfigError(f"{p}: steps and epochs both set (give one)")
    return check_types(out, f"{p}: ")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def recipe_text(cfg: TrainConfig) -> str:
    """The resolved settings of a run as TOML (``--config`` reads it back). Not in it: ``out``,
    ``resume`` and ``progress`` (where a run writes, what it continues, how it shows) and unset values.
    With ``epochs`` the resolved step count is a comment (a recipe holds one of the two)."""
    lines = ["# gemmaforge train: the resolved settings of this run (--config FILE starts a new run with them,",
             "# --resume RUN_DIR continues this one; flags given again override)"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in NOT_IN_RECIPE or v is None:
            continue
        if f.name == "steps" and cfg.epochs is not None:
            lines.append(f"# steps = {v}  (resolved from epochs)")
            continue
        lines.append(f"{_flag(f.name)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def write_recipe(cfg: TrainConfig, run_dir: str | Path) -> Path:
    p = Path(run_dir) / RECIPE
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(recipe_text(cfg))
    tmp.replace(p)
    return p


def absolute_paths(values: dict) -> dict:
    """Data and model paths that exist, made absolute (a recipe stays valid from another directory)."""
    out = dict(values)
    for key in ("data", "val_data"):
        if out.get(key):
            out[key] = [str(Path(x).expanduser().resolve()) if Path(x).expanduser().exists() else x
                        for x in out[key]]
    m = out.get("model")
    if m and Path(m).expanduser().exists():
        out["model"] = str(Path(m).expanduser().resolve())
    return out


def merge_settings(*layers: dict) -> dict:
    """Settings layered lowest first (a run's own recipe, ``--config``, the flags): a later layer
    overrides; its ``steps`` replaces an earlier ``epochs`` and its ``epochs`` an earlier ``steps``."""
    out: dict = {}
    for layer in layers:
        if "steps" in layer and "epochs" in layer:
            raise ConfigError("--steps and --epochs both given (give one)")
        if "steps" in layer:
            out.pop("epochs", None)
        if "epochs" in layer:
            out.pop("steps", None)
        out.update(layer)
    return out


def run_dir_of(path: str | Path) -> Path:
    """The run directory of ``--resume PATH``: a run dir, its ``checkpoints/`` or one ``step-N`` dir in it."""
    p = Path(path)
    if p.name == "checkpoints":
        return p.parent
    if p.parent.name == "checkpoints":
        return p.parent.parent
    return p


def run_settings(resume: str | Path) -> dict:
    """The settings a run was started with (its ``recipe.toml``; an older run's ``config.json``), for
    ``--resume``; {} for a run dir that has neither."""
    d = run_dir_of(resume)
    for name in (RECIPE, "config.json"):
        if (d / name).is_file():
            return load_recipe(d / name)
    return {}
