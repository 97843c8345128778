"""What a run trains for: a task gives the Trainer its data, its batch source and its objective.

The Trainer is one loop for every task; a task is the part that differs:

* ``load_data(trainer, train_docs, val_docs) -> (train_items, val_items)``: read and check the data
  (before the model loads: bad data fails in a second);
* ``data_id(trainer) -> str``: the data's identity (a checkpoint continues only with the same);
* ``items_per_step(trainer) -> int``: how many of ``train_items`` one step takes (``--epochs``);
* ``needs_reference(dims)``: a frozen reference policy is built beside the model under this layout
  (not with LoRA: the same weights with the adapters disabled are the reference);
* ``build(trainer) -> (source, objective)``: once the model (and the reference) exist;
* ``fingerprint() -> dict``: the task's settings a checkpoint continues only with;
* ``check_layout(dims)``: the parallel layouts it cannot run (one ``LayoutError`` line);
* ``plot(trainer)``: pictures of its own metrics (besides ``loss.png``).

``CausalLMTask`` is plain causal-LM training (documents packed into rows); ``DPOTask`` preference pairs.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from pathlib import Path

from ..errors import ConfigError, DataError
from ..parallel.dims import LayoutError
from .objectives import CausalLMLoss, DPOLoss
from .sources import PackedRowSource, PrecomputedReference, Reference


def rows_id(rows) -> str:
    """The training rows' identity: their count and a digest of their tokens, labels and boundaries."""
    h = hashlib.sha256()
    for r in rows:
        for t in (r.input_ids, r.labels, r.cu_seqlens):
            h.update(t.numpy().tobytes())
    return f"{len(rows)} rows, sha256 {h.hexdigest()[:16]}"


class CausalLMTask:
    name = "causal-lm"
    command = "train"  # the CLI command that runs it (resume hints)
    unit = "rows"  # what items_per_step counts

    def needs_reference(self, dims) -> bool:
        return False

    def load_data(self, trainer, train_docs, val_docs):
        return trainer._load_data(train_docs, val_docs)

    def data_id(self, trainer) -> str:
        return rows_id(trainer.train_rows)

    def items_per_step(self, trainer) -> int:
        return trainer.cfg.accum * trainer.cfg.rows_per_micro_batch

    def check_layout(self, dims) -> None:
        pass

    def _source(self, trainer, collate=None, reference=None) -> PackedRowSource:
        cfg = trainer.cfg
        kw = {} if collate is None else {"collate": collate}
        return PackedRowSource(trainer.train_rows, trainer.val_rows, seed=cfg.seed,
                               rows_per_step=cfg.accum * cfg.rows_per_micro_batch,
                               rows_per_micro_batch=1 if trainer.pipe is not None else cfg.rows_per_micro_batch,
                               dp_rank=trainer.dp_rank, dp_shard=trainer.dims.dp_shard if trainer.dims else 1,
                               reference=reference, **kw)

    def build(self, trainer):
        return self._source(trainer), CausalLMLoss(chunk_size=trainer.cfg.loss_chunk_size)

    def fingerprint(self) -> dict:
        return {}

    def plot(self, trainer) -> list[Path]:
        return []


def refuse_split_rows(name: str, dims) -> None:
    """A preference pair / rollout must sit whole on one rank and one stage: no CP, no PP."""
    if dims is not None and (dims.cp > 1 or dims.pp > 1):
        which = f"--cp {dims.cp}" if dims.cp > 1 else f"--pp {dims.pp}"
        raise LayoutError(f"parallel layout: {name} needs each sequence whole on one rank ({which} splits rows or "
                          f"layers); use FSDP (--dp-shard) and/or --tp")


class DPOTask(CausalLMTask):
    """Direct preference optimisation on ``{"prompt", "chosen", "rejected"}`` JSONL pairs (``rl.dpo``)."""

    name = "dpo"
    command = "dpo"

    REFERENCES = ("precompute", "live")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", reference: str = "precompute"):
        """``reference``: ``precompute`` (default): a full fine-tune's reference log-probs of every row are
        computed once before step 1 and the frozen copy is freed (the run holds one model, not two);
        ``live``: the frozen copy scores each batch as it comes. With LoRA (the policy with its adapters
        disabled is the reference: no copy to free) and under a parallel layout the reference is live."""
        DPOLoss(beta=beta, loss_type=loss_type)  # bad settings fail before any data or model loads
        if reference not in self.REFERENCES:
            raise ConfigError(f"--reference {reference}: choose {' or '.join(self.REFERENCES)}")
        self.beta, self.loss_type, self.reference = float(beta), loss_type, reference

    def _precomputes(self, dims) -> bool:
        return self.reference == "precompute" and dims is None

    def needs_reference(self, dims) -> bool:
        """A frozen copy only to score live (``--reference live``, or under a parallel layout)."""
        return not self._precomputes(dims)

    def check_layout(self, dims) -> None:
        refuse_split_rows("DPO", dims)

    def load_data(self, trainer, train_docs, val_docs):
        from ..data import train_val_split
        from ..rl.dpo import load_preferences, pack_pairs

        cfg = trainer.cfg
        if train_docs is not None:  # pairs given directly (tests, Python use)
            train_pairs, val_pairs = list(train_docs), list(val_docs or [])
            own_val = True
        else:
            if not cfg.data:
                raise DataError("dpo needs preference data: --data prefs.jsonl (lines {\"prompt\", \"chosen\", "
                                "\"rejected\"})")
            pairs = load_preferences(cfg.data, trainer.tokenizer)
            own_val = bool(cfg.val_data)
            if own_val:
                train_pairs, val_pairs = pairs, load_preferences(cfg.val_data, trainer.tokenizer)
            else:
                train_pairs, val_pairs = train_val_split(pairs, cfg.val_fraction, seed=cfg.seed)
        train_rows = pack_pairs(train_pairs, cfg.seq_len)
        val_rows = pack_pairs(val_pairs, cfg.seq_len) if val_pairs else []
        if not own_val:
            val_rows = val_rows[: cfg.eval_rows]
        n_val = sum(r.num_pairs for r in val_rows)
        trainer.log(f"data: {len(train_pairs)} preference pairs -> {len(train_rows)} packed rows of {cfg.seq_len}; "
                    f"{n_val} held-out pairs in {len(val_rows)} rows")
        return train_rows, val_rows

    def build(self, trainer):
        from ..rl.dpo import collate_pairs

        ref = Reference(trainer.model, trainer.ref_model, autocast=trainer.autocast)
        if self._precomputes(trainer.dims) and not trainer.cfg.lora_rank:
            ref = self._precompute(trainer, ref)
        return self._source(trainer, collate=collate_pairs, reference=ref), DPOLoss(self.beta, self.loss_type)

    @staticmethod
    def _precompute(trainer, ref: Reference) -> PrecomputedReference:
        """The reference's log-probs of every row, by the model itself: ``build`` runs before a resumed
        run's checkpoint is restored, so the model still holds the base weights (the reference) and no
        frozen copy is made at all."""
        rows = list(trainer.train_rows) + list(trainer.val_rows)
        progress = None
        if trainer.show_bar:
            from tqdm import tqdm

            progress = functools.partial(tqdm, desc="reference log-probs", unit="row", file=sys.stderr)
        t0 = time.perf_counter()
        table = PrecomputedReference(ref, rows, progress=progress)
        trainer.log(f"reference: log-probs of {len(rows)} rows precomputed in {time.perf_counter() - t0:.1f} s "
                    "by the base weights; no frozen copy kept (--reference live keeps one)")
        return table

    def fingerprint(self) -> dict:
        return {"task": self.name, "beta": self.beta, "loss_type": self.loss_type}  # reference: the same math

    def plot(self, trainer) -> list[Path]:
        from .metrics import plot_series

        return [plot_series(trainer.metrics_path, trainer.out / "rewards.png",
                            ["reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"],
                            ylabel="implicit reward (beta * log-ratio); accuracy")]


class GRPOTask(CausalLMTask):
    """Group relative policy optimisation: each ``updates_per_batch`` steps, ``group_size`` completions of
    ``prompts_per_step`` prompts (``{"prompt", ...}`` JSONL) are sampled from the policy and scored by
    ``reward`` (``fn(prompt, completion, row) -> float``, or ``"module:function"``); see ``RolloutSource``
    and ``GRPOLoss``. ``generate``: replaces ``sources.sample_completions`` (tests feed fixed rollouts)."""

    name = "grpo"
    command = "grpo"
    unit = "prompts"

    def __init__(self, reward, *, group_size: int = 8, max_new_tokens: int = 128, temperature: float = 1.0,
                 beta: float = 0.04, updates_per_batch: int = 1, prompts_per_step: int = 2, clip_eps: float = 0.2,
                 generate=None):
        from ..errors import ConfigError
        from ..rl.rewards import load_reward

        checks = (("group-size", group_size, group_size >= 2, "at least 2 (advantages compare a group)"),
                  ("max-new-tokens", max_new_tokens, max_new_tokens >= 1, "positive"),
                  ("temperature", temperature, temperature > 0, "positive (GRPO samples)"),
                  ("beta", beta, beta >= 0, "0 or more"),
                  ("updates-per-batch", updates_per_batch, updates_per_batch >= 1, "positive"),
                  ("prompts-per-step", prompts_per_step, prompts_per_step >= 1, "positive"),
                  ("clip-eps", clip_eps, clip_eps > 0, "positive"))
        for flag, v, ok, what in checks:
            if not ok:
                raise ConfigError(f"--{flag} must be {what} (got {v})")
        self.reward_name = reward if isinstance(reward, str) else getattr(reward, "__qualname__", repr(reward))
        self.reward_fn = load_reward(reward) if isinstance(reward, str) else reward
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, float(temperature)
        self.beta, self.updates_per_batch, self.prompts_per_step = float(beta), updates_per_batch, prompts_per_step
        self.clip_eps, self.generate = float(clip_eps), generate

    def needs_reference(self, dims) -> bool:
        return self.beta > 0

    def check_layout(self, dims) -> None:
        refuse_split_rows("GRPO", dims)

    def load_data(self, trainer, train_docs, val_docs):
        from ..rl.grpo import read_prompts

        cfg = trainer.cfg
        if train_docs is not None:
            items = list(train_docs)
        else:
            if not cfg.data:
                raise DataError('grpo needs prompts: --data prompts.jsonl (lines {"prompt": ..., other fields for '
                                'the reward})')
            items = [it for p in cfg.data for it in read_prompts(p, trainer.tokenizer)]
        for it in items:
            if len(it.ids) + self.max_new_tokens > cfg.seq_len:
                raise DataError(f"{it.where}: the prompt is {len(it.ids)} tokens: with --max-new-tokens "
                                f"{self.max_new_tokens} a rollout may not fit a row (--seq-len {cfg.seq_len}); "
                                f"raise --seq-len")
        trainer.log(f"data: {len(items)} prompts, {self.prompts_per_step} per step x {self.group_size} completions "
                    f"of up to {self.max_new_tokens} tokens")
        return items, []

    def data_id(self, trainer) -> str:
        h = hashlib.sha256()
        for it in trainer.train_rows:
            h.update(repr((it.ids, sorted(it.row.items(), key=lambda kv: kv[0]))).encode())
        return f"{len(trainer.train_rows)} prompts, sha256 {h.hexdigest()[:16]}"

    def items_per_step(self, trainer) -> int:
        return self.prompts_per_step

    def build(self, trainer):
        from .objectives import GRPOLoss
        from .sources import RolloutSource

        cfg = trainer.cfg
        ref = Reference(trainer.model, trainer.ref_model, autocast=trainer.autocast,
                        temperature=self.temperature) if self.beta > 0 else None
        src = RolloutSource(trainer.model, trainer.tokenizer, trainer.train_rows, seed=cfg.seed,
                            prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature, seq_len=cfg.seq_len,
                            rows_per_micro_batch=cfg.micro_batch_rows, updates_per_batch=self.updates_per_batch,
                            reward_fn=self.reward_fn, reward_name=self.reward_name, reference=ref,
                            autocast=trainer.autocast, dp_rank=trainer.dp_rank,
                            dp_shard=trainer.dims.dp_shard if trainer.dims else 1, generate=self.generate)
        return src, GRPOLoss(beta=self.beta, clip_eps=self.clip_eps, temperature=self.temperature)

    def fingerprint(self) -> dict:
        return {"task": self.name, "reward": self.reward_name, "group_size": self.group_size,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "beta": self.beta,
                "updates_per_batch": self.updates_per_batch, "prompts_per_step": self.prompts_per_step,
                "clip_eps": self.clip_eps}

    def plot(self, trainer) -> list[Path]:
        from .metrics import plot_series

        return [plot_series(trainer.metrics_path, trainer.out / "reward.png",
                            ["reward_mean", "kl", "entropy", "completion_len"])]
