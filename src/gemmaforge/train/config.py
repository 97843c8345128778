"""The training run's settings (``TrainConfig``, mirrored by ``gemmaforge train``'s flags) and recipes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass
class TrainConfig:
    model: str | None = None  # HF dir, .gguf, or preset name; None = embedded gemma-3-270m
    data: list[str] = field(default_factory=list)  # .txt / dir / .jsonl; empty = CPython's language reference
    val_data: list[str] = field(default_factory=list)  # validation files of one's own (same formats): all of
    # their documents validate, all of `data` trains (val_fraction and eval_rows do not apply); empty = the split
    out: str | None = None  # default runs/<timestamp>
    steps: int = 16
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
    micro_batch_rows: int = 2  # rows per forward: the default 512-token step in one forward (a second micro-batch
    # would hold a second [V, H] head gradient: 270M, 5.31 vs 4.66 GiB peak and slower)
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 8
    eval_rows: int = 4
    save_every: int = 8
    keep_last: int = 2
    max_bad_steps: int = 3
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
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
    progress: bool = True

    @property
    def rows_per_micro_batch(self) -> int:
        """``micro_batch_rows``, but never more rows than one step holds (``batch_tokens // seq_len``)."""
        return max(1, min(self.micro_batch_rows, self.batch_tokens // self.seq_len))

    @property
    def accum(self) -> int:
        per_micro = self.seq_len * self.rows_per_micro_batch
        return max(1, self.batch_tokens // per_micro)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_tokens", "micro_batch_rows", "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive (got {self.lr})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--schedule must be cosine, linear or constant (got {self.schedule!r})")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def load_recipe(path: str | Path) -> dict:
    """A ``recipe.toml`` whose keys mirror the flags (dashes or underscores)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    out = {}
    known = TrainConfig.field_names()
    for k, v in d.items():
        key = k.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{p}: unknown key {k!r}")
        out[key] = v
    return out
