"""GRPO runs for tests/test_grpo.py: one process, and FSDP2 x 2 (spawned by ``gemmaforge.parallel.process.launch``),
both through the production Trainer with the same seeded rollouts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _tests():
    p = str(Path(__file__).resolve().parents[1])
    if p not in sys.path:
        sys.path.insert(0, p)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(out: str, fsdp: bool) -> dict:
    """3 GRPO steps (2 updates per rollout batch, a frozen reference), then (under FSDP) one real sampled
    rollout batch. Returns the metrics rows, the trained weights and the sampled completions."""
    _tests()
    import test_grpo as g

    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.parallel.process import is_rank0
    from gemmaforge.rl.rewards import has_number
    from gemmaforge.train import TrainConfig, Trainer, read_metrics
    from gemmaforge.train.tasks import GRPOTask

    cfg = TrainConfig(out=out, steps=3, lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=128, micro_batch_rows=1,
                      eval_every=0, save_every=0, progress=False, dtype="float32", seed=1, eps=1e-4)
    task = GRPOTask(has_number, group_size=4, max_new_tokens=8, prompts_per_step=2, updates_per_batch=2,
                    generate=g.fixed_generate)
    model = g.tiny(0) if is_rank0() else None
    tr = Trainer(cfg, model=model, tokenizer=g.TOK, train_docs=g.prompts(), task=task,
                 dims=ParallelDims(dp_shard=2) if fsdp else None, log=lambda m: None)
    sampled = []
    if fsdp:  # the rollouts' sampler on the sharded policy (before training: it must leave the model as it was)
        from gemmaforge.train.sources import sample_completions

        ps = [it.ids for it in g.prompts(2) for _ in range(4)]
        sampled = sample_completions(tr.model, ps, max_new_tokens=6, temperature=1.0, seeds=list(range(8)),
                                     stop_ids={1})
    tr.run()
    weights = {n: _full(p).detach().clone() for n, p in tr.model.named_parameters()}
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r] if is_rank0() else []
    return {"metrics": rows, "weights": weights, "sampled": sampled}


def run_dpo(out: str, fsdp: bool) -> dict:
    """3 DPO steps (full fine-tune: the frozen reference sharded like the policy) with evaluation."""
    _tests()
    import test_dpo as d

    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.parallel.process import is_rank0
    from gemmaforge.train import TrainConfig, Trainer, read_metrics
    from gemmaforge.train.tasks import DPOTask

    cfg = TrainConfig(out=out, steps=3, lr=3e-3, warmup_steps=1, seq_len=64, batch_tokens=128, micro_batch_rows=1,
                      eval_every=0, save_every=0, progress=False, dtype="float32", seed=1, eps=1e-4)
    pairs = d.make_pairs(40)
    tr = Trainer(cfg, model=d.tiny(0) if is_rank0() else None, tokenizer=d.TOK, train_docs=pairs[:32],
                 val_docs=pairs[32:36], task=DPOTask(beta=0.1), dims=ParallelDims(dp_shard=2) if fsdp else None,
                 log=lambda m: None)
    tr.run()
    rows = read_metrics(Path(out) / "metrics.jsonl") if is_rank0() else []
    return {"metrics": rows, "weights": {n: _full(p).detach().clone() for n, p in tr.model.named_parameters()}}


def run_fsdp(rank: int, world: int, out: str) -> dict:
    return {**run(out, fsdp=True), "dpo": run_dpo(out + "-dpo", fsdp=True)}
