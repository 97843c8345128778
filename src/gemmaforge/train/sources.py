"""Batch sources: where the Trainer's micro-batches come from, step by step.

A source is a small object the Trainer asks for the next step's micro-batches; it owns the data
position, so a checkpoint resumes it exactly:

* ``batches(step) -> list[dict]``: THIS rank's collated micro-batches of the step (every rank the same
  number of them: collectives run in lockstep), with every field the objective's ``targets`` reads;
* ``val_batches() -> list[dict]``: this rank's validation micro-batches ([] when there are none);
* ``state_dict()`` / ``load_state_dict(d)``: the position (torch.save-able: numbers, tensors, lists);
* ``pop_metrics() -> {name: (sum, weight)}``: what the source measured since the last call (rollout
  rewards...), summed over this rank's items; the Trainer all-reduces them over the data-parallel ranks.

``PackedRowSource`` serves packed rows (documents for causal-LM training, preference pairs for DPO) in a
seeded order; ``RolloutSource`` (GRPO) makes its rows by sampling from the policy.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..adapters.lora import adapters_disabled
from ..cpu_policy import release_packed
from ..data import collate_rows
from ..parallel.process import shard_items
from ..rl.score import score
from .data import RowStream


class Reference:
    """The reference policy's per-token log-probs of a batch's labels, without gradient: a frozen copy
    (``ref_model``), or, for a LoRA run, the policy itself with its adapters disabled (no second copy
    in memory). Under a parallel layout the copy is sharded as the policy is, and every rank scores its
    own rows (collective, in lockstep like the step)."""

    def __init__(self, model, ref_model=None, *, autocast: torch.dtype | None = None, chunk_size: int = 512,
                 temperature: float = 1.0):
        self.model, self.ref_model, self.autocast, self.chunk_size = model, ref_model, autocast, chunk_size
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: dict, rows: list | None = None) -> torch.Tensor:
        """``[B, T]`` fp32: log p_ref(labels[t]) where ``labels[t] != -100``, 0 elsewhere (``rows``: the
        batch's rows, which only a ``PrecomputedReference`` reads)."""
        m = self.ref_model if self.ref_model is not None else self.model
        ctx = adapters_disabled(self.model) if self.ref_model is None else contextlib.nullcontext()
        dev = next(m.parameters()).device
        was = m.training
        m.eval()
        try:
            with ctx, torch.autocast(dev.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
                out = score(m, batch["input_ids"].to(dev), batch["cu_seqlens"].to(dev), labels=batch["labels"].to(dev),
                            chunk_size=self.chunk_size, temperature=self.temperature)
        finally:
            m.train(was)
        return out.logprobs


class PrecomputedReference:
    """The reference's per-token log-probs of every row, computed once before training (one row per
    forward, in the rows' order: the same numbers on every run and resume) by ``reference`` (DPO's
    default, ``--reference precompute``: the model itself before any step or restored checkpoint, so
    a full fine-tune holds no frozen copy). ``logprobs(batch, rows)`` returns the kept rows'."""

    def __init__(self, reference: Reference, rows: list, progress=None):
        self._of: dict[int, torch.Tensor] = {}
        self._rows = rows  # kept alive: the table is keyed by the rows' identity
        for r in (progress(rows) if progress is not None else rows):
            if id(r) not in self._of:
                self._of[id(r)] = reference.logprobs(collate_rows([r]))[0].cpu()

    def logprobs(self, batch: dict, rows: list | None = None) -> torch.Tensor:
        if rows is None:
            raise ValueError("precomputed reference log-probs are looked up by row: pass the batch's rows")
        return torch.stack([self._of[id(r)] for r in rows])


class PackedRowSource:
    """Packed rows in a deterministic, resumable order (a seeded permutation per epoch): every rank draws
    the step's SAME global rows and keeps its data-parallel share, so the position is layout-independent.
    ``collate`` turns rows into a micro-batch; ``reference`` (DPO) adds ``ref_logprobs`` to each."""

    def __init__(self, rows: list, val_rows: list, *, seed: int, rows_per_step: int, rows_per_micro_batch: int,
                 dp_rank: int = 0, dp_shard: int = 1, collate: Callable = collate_rows,
                 reference: Reference | PrecomputedReference | None = None):
        self.rows, self.val_rows, self.seed = rows, val_rows, seed
        self.rows_per_step, self.per = rows_per_step, rows_per_micro_batch
        self.dp_rank, self.dp_shard = dp_rank, dp_shard
        self.collate, self.reference = collate, reference
        self.stream = RowStream(rows, seed)
        self._val: list[dict] | None = None

    def _prepare(self, rows: list) -> dict:
        batch = self.collate(rows)
        if self.reference is not None:
            batch["ref_logprobs"] = self.reference.logprobs(batch, rows)
        return batch

    def _mine(self, rows: list) -> list:
        return shard_items(rows, self.dp_rank, self.dp_shard) if self.dp_shard > 1 else rows

    def batches(self, step: int) -> list[dict]:
        rows = [self.stream.next() for _ in range(self.rows_per_step)]
        mine = self._mine(rows)
        return [self._prepare(mine[i:i + self.per]) for i in range(0, len(mine), self.per)]

    def val_batches(self) -> list[dict]:
        """One row per micro-batch (the reference's log-probs of them computed once and kept)."""
        if self._val is None:
            self._val = [self._prepare([r]) for r in self._mine(self.val_rows)]
        return self._val

    def where(self, state: dict, micro_batch: int) -> str:
        return f"data epoch {state['epoch']} row {state['cursor'] + micro_batch * self.per}"

    def state_dict(self) -> dict:
        return self.stream.state()

    def load_state_dict(self, d: dict) -> None:
        self.stream = RowStream(self.rows, self.seed, d["epoch"], d["cursor"])

    def pop_metrics(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- GRPO rollouts

def sample_completions(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                       seeds: list[int], stop_ids: set[int]) -> list[list[int]]:
    """The one place rollouts are generated: one completion per prompt (a prompt repeated ``group_size``
    times is a group) by the batched generator (``inference.batch.generate_batch_ids``: every prompt of
    the step in one ragged batch), each row with its own seed; a completion that stopped ends with its
    stop id (stopping is part of what is trained). The model generates in eval mode under ``no_grad``
    (not inference mode: FSDP2's gathered parameters and the kept head buffers made in generation's
    forwards are used again in training); on CPU its weights go back to their training layout
    afterwards (generation re-strides them column-major)."""
    from ..inference.batch import generate_batch_ids

    was = model.training
    layout = {id(p): p.is_contiguous() for p in model.parameters()}
    model.eval()
    try:
        stats = generate_batch_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=list(seeds), stop_ids=stop_ids, return_stats=True, inference_mode=False)
    finally:
        model.train(was)
        with torch.no_grad():
            for p in model.parameters():
                if layout.get(id(p), False) and not p.is_contiguous():
                    p.data = p.data.contiguous()
    return [ids + ([stop] if stop is not None else []) for ids, stop in zip(stats.ids, stats.stopped_on)]


def _policy_logprobs(model, batch: dict, autocast, temperature: float, chunk_size: int) -> torch.Tensor:
    """The current policy's log-probs of a batch's labels, without gradient (GRPO's old log-probs)."""
    dev = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return score(model, batch["input_ids"].to(dev), batch["cu_seqlens"].to(dev), labels=batch["labels"].to(dev),
                     temperature=temperature, chunk_size=chunk_size).logprobs


class RolloutSource:
    """GRPO's rows, made by sampling: every ``updates_per_batch`` steps it takes ``prompts_per_step``
    prompts (a seeded, resumable order), samples ``group_size`` completions of each (row seeds derived
    from the run's seed, the step and the rollout: the same rollouts at any layout and after a resume),
    scores them with the reward, normalises the rewards in each group (``rl.score.grpo_advantages``) and
    packs prompt + completion pairs into rows of ``seq_len`` (``rl.grpo.rollout_rows``). Then, on this
    rank's share of the rows (padded with empty rows so every rank runs as many micro-batches), it
    records the old log-probs (the sampling policy's, when a batch serves several updates; with one
    update they equal the current policy's, which the objective detaches) and the reference's.

    Under a parallel layout every rank generates the step's rollouts (the same ones: generation runs
    the sharded model's collectives in lockstep) and trains on its share."""

    def __init__(self, model, tokenizer, items: list, *, seed: int, prompts_per_step: int, group_size: int,
                 max_new_tokens: int, temperature: float, seq_len: int, rows_per_micro_batch: int,
                 updates_per_batch: int, reward_fn, reward_name: str, reference: Reference | None,
                 autocast: torch.dtype | None = None, dp_rank: int = 0, dp_shard: int = 1, generate=None,
                 chunk_size: int = 512):
        from ..inference.generate import stop_ids_of

        self.model, self.tokenizer, self.items, self.seed = model, tokenizer, items, seed
        self.P, self.G, self.K = prompts_per_step, group_size, updates_per_batch
        self.max_new_tokens, self.temperature, self.seq_len = max_new_tokens, temperature, seq_len
        self.per, self.dp_rank, self.dp_shard = rows_per_micro_batch, dp_rank, dp_shard
        self.reward_fn, self.reward_name, self.reference, self.autocast = reward_fn, reward_name, reference, autocast
        self.generate = generate or sample_completions
        self.chunk_size = chunk_size
        self.stop_ids = stop_ids_of(model, tokenizer)
        self.stream = RowStream(items, seed)
        self._cache: list[dict] | None = None
        self._rollout_metrics: dict = {}
        self._timing: dict = {}
        self.last_rollouts: list[dict] = []  # the latest step's prompts, completions and rewards (for inspection)

    def _seeds(self, step: int, n: int) -> list[int]:
        from ..inference.batch import row_seed

        return [row_seed(self.seed * 1_000_003 + step, k) for k in range(n)]

    def _rollout(self, step: int) -> None:
        import time

        from ..rl.grpo import collate_rollouts, empty_row, rollout_rows
        from ..rl.rewards import call_reward
        from ..rl.score import grpo_advantages

        items = [self.stream.next() for _ in range(self.P)]
        prompts = [it.ids for it in items for _ in range(self.G)]
        t0 = time.perf_counter()
        comps = self.generate(self.model, prompts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              seeds=self._seeds(step, len(prompts)), stop_ids=self.stop_ids)
        release_packed(self.model)  # decoding's packed weight copies do not stay beside the training step
        t_gen = time.perf_counter() - t0
        rewards, self.last_rollouts = [], []
        for k, c in enumerate(comps):
            it = items[k // self.G]
            text = self.tokenizer.decode(c, skip_special_tokens=True)
            r = call_reward(self.reward_fn, it.text, text, it.row, it.where, self.reward_name)
            rewards.append(r)
            self.last_rollouts.append({"prompt": it.text, "completion": text, "reward": r})
        adv = grpo_advantages(rewards, group_size=self.G)
        rows = rollout_rows(prompts, comps, adv, self.seq_len)
        share = -(-len(rows) // self.dp_shard)
        share = -(-share // self.per) * self.per
        rows += [empty_row(self.seq_len) for _ in range(share * self.dp_shard - len(rows))]
        mine = rows[self.dp_rank::self.dp_shard]
        t0 = time.perf_counter()
        batches = [collate_rollouts(mine[i:i + self.per]) for i in range(0, len(mine), self.per)]
        for b in batches:
            if self.K > 1:
                b["old_logprobs"] = _policy_logprobs(self.model, b, self.autocast, self.temperature, self.chunk_size)
            if self.reference is not None:
                b["ref_logprobs"] = self.reference.logprobs(b)
        t_ref = time.perf_counter() - t0
        r = torch.tensor(rewards, dtype=torch.float64)
        n = len(rewards)
        lengths = [len(c) for c in comps]
        self._rollout_metrics = {"reward_mean": (float(r.sum()), n), "reward_std": (float(r.std(unbiased=False)) * n, n),
                                 "completion_len": (float(sum(lengths)), n)}
        self._timing = {"generate_s": (t_gen, 1), "reference_s": (t_ref, 1)}
        self._cache = batches

    def batches(self, step: int) -> list[dict]:
        if self._cache is None or step % self.K == 0:
            self._rollout(step)
        return self._cache

    def val_batches(self) -> list[dict]:
        return []

    def where(self, state: dict, micro_batch: int) -> str:
        return f"prompts epoch {state['epoch']} from prompt {state['cursor'] - self.P}, micro-batch {micro_batch}"

    def pop_metrics(self) -> dict:
        out = {**self._rollout_metrics, **self._timing}
        self._timing = {}
        return out

    def state_dict(self) -> dict:
        return {**self.stream.state(), "cache": self._cache, "rollout_metrics": self._rollout_metrics}

    def load_state_dict(self, d: dict) -> None:
        self.stream = RowStream(self.items, self.seed, d["epoch"], d["cursor"])
        self._cache = d.get("cache")
        self._rollout_metrics = d.get("rollout_metrics") or {}
