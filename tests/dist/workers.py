"""Multi-process workers for tests/test_distributed.py (spawned by gemmaforge.parallel.process.launch).

Every worker trains the tiny Gemma 3 for a few AdamW steps on fixed packed rows with the trainer's
loss (chunked cross-entropy summed over valid tokens / the step's global valid-token count) and
returns the per-step losses and the final full state dict (rank 0), so the test can compare any
layout with the single-process run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_LEN = 32
ROWS_PER_STEP = 4
STEPS = 4
LR = 1e-3
# Adam's first steps are ~sign(g): where |g| is near eps, fp32 rounding differences between layouts
# (different reduction orders, ~1e-6 relative) would be amplified to ~lr. eps well above the
# rounding level of the gradients keeps "same weights to 1e-5" a statement about the layouts.
EPS = 1e-4


def tiny_config(**over):
    import gemmaforge

    return gemmaforge.preset("gemma-3-tiny", **over)


def make_rows(seed: int = 0, seq_len: int = SEQ_LEN, n_rows: int = ROWS_PER_STEP * STEPS, vocab: int = 512,
              min_len: int = 3, max_len: int = 40):
    """Random documents packed (greedy, documents cut at row ends) into ``n_rows`` rows with cu_seqlens."""
    from gemmaforge.data import Document
    from gemmaforge.data.packing import pack_documents

    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < seq_len * n_rows + 64:
        n = int(torch.randint(min_len, max_len, (1,), generator=g))
        docs.append(Document(torch.randint(1, vocab, (n,), generator=g).tolist()))
        total += n
    rows = pack_documents(docs, seq_len, strategy="greedy")
    return rows[:n_rows]


def initial_state(seed: int = 0, **over):
    import gemmaforge

    model = gemmaforge.from_config(tiny_config(**over), seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _param_groups(model, weight_decay):
    """train.param_groups' rule (no decay on norms, biases, embeddings), on full-model names."""
    from gemmaforge.parallel.init import canonical_name

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        name = canonical_name(model, name)
        (no_decay if p.dim() < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model):
    return torch.optim.AdamW(_param_groups(model, 0.01), lr=LR, betas=(0.9, 0.95), eps=EPS,
                             foreach=False)


def _loss_sum(model, batch, cp=None):
    from gemmaforge.ops.head_loss import chunked_cross_entropy

    if cp is not None:
        return cp.loss_sum(model, batch, chunk_size=16)
    hidden = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], return_hidden=True)
    return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                 batch["labels"].reshape(-1), chunk_size=16, reduction="sum")


def train_single(steps: int = STEPS, seed: int = 0, rows=None, attn_backend: str | None = None):
    """The single-process reference: returns (losses, final state dict)."""
    import gemmaforge
    from gemmaforge.data import collate_rows

    torch.manual_seed(seed)
    model = gemmaforge.from_config(tiny_config(), seed=seed).train()
    model.attn_backend = attn_backend
    rows = rows if rows is not None else make_rows(seed)
    opt = _optimizer(model)
    losses = []
    for s in range(steps):
        step_rows = rows[s * ROWS_PER_STEP:(s + 1) * ROWS_PER_STEP]
        batches = [collate_rows([r]) for r in step_rows]
        n_valid = sum(b["num_valid_labels"] for b in batches)
        total = 0.0
        for b in batches:
            loss = _loss_sum(model, b) / n_valid
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_parallel(layout: dict, seed: int = 0, init: str = "load", ac: bool = False, attn_backend=None,
                   config_over: dict | None = None, pcfg: dict | None = None):
    """Meta-build the tiny model, parallelize with ``layout`` (ParallelDims kwargs), materialise it."""
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.init import build_meta_model, materialize
    from gemmaforge.parallel.parallelize import parallelize

    dims = ParallelDims(**layout)
    mesh = dims.build_mesh("cpu")
    model = build_meta_model(tiny_config(**(config_over or {})))
    parallelize(model, mesh, ParallelConfig(activation_checkpointing=ac, **(pcfg or {})))
    if init == "load":
        sd = initial_state(seed, **(config_over or {})) if dist.get_rank() == 0 else {}
        materialize(model, "cpu", state_dict=sd)
    else:
        materialize(model, "cpu", seed=seed)
    model.train()
    model.attn_backend = attn_backend
    return model, mesh


def train_parallel(rank: int, world: int, layout: dict, steps: int = STEPS, seed: int = 0, init: str = "load",
                   ac: bool = False, ckpt_dir: str | None = None, export_dir: str | None = None,
                   resume_dir: str | None = None, start_step: int = 0, attn_backend=None, with_grads: bool = False):
    """One rank of a parallel run; rank 0 returns (losses, final full state dict[, first-step grads])."""
    from gemmaforge.data import collate_rows
    from gemmaforge.parallel.process import all_reduce_sum, shard_items
    from gemmaforge.parallel.cp import ContextParallel
    from gemmaforge.parallel.dims import parallel_state
    from gemmaforge.parallel.grads import clip_grad_norm_
    from gemmaforge.parallel.state import full_state_dict

    model, mesh = build_parallel(layout, seed, init, ac, attn_backend)
    st = parallel_state(model)
    opt = _optimizer(model)
    if resume_dir is not None:
        from gemmaforge.train.checkpointer import load_distributed

        load_distributed(resume_dir, model, opt)
    cp = ContextParallel(mesh["cp"]) if st.dims.cp > 1 else None
    rows = make_rows(seed)
    losses = []
    for s in range(start_step, start_step + steps):
        step_rows = rows[s * ROWS_PER_STEP:(s + 1) * ROWS_PER_STEP]
        mine = shard_items(step_rows, st.dp_rank, st.dims.dp_shard)
        batches = [collate_rows([r]) for r in mine]
        n_valid = all_reduce_sum(sum(b["num_valid_labels"] for b in batches), st.dp_group)
        total = 0.0
        for b in batches:
            loss = _loss_sum(model, b, cp) / n_valid
            loss.backward()
            total += float(loss.detach())
        total = all_reduce_sum(total, st.loss_group)
        if with_grads and s == start_step:  # collective: every rank gathers
            grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    if ckpt_dir is not None:
        from gemmaforge.train.checkpointer import save_distributed

        save_distributed(ckpt_dir, model, opt, extra={"step": start_step + steps})
    if export_dir is not None:
        from gemmaforge.parallel.state import export_hf

        export_hf(model, export_dir)
    sd = full_state_dict(model)
    if rank != 0:
        return None
    return (losses, sd, grads) if with_grads else (losses, sd)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def materialized_states(rank: int, world: int, layouts: list, seed: int = 3):
    """Random init after sharding (``materialize(seed=...)``) at several layouts: full state dicts on rank 0."""
    from gemmaforge.parallel.state import full_state_dict

    out = []
    for layout in layouts:
        model, _ = build_parallel(layout, seed, init="seed")
        out.append(full_state_dict(model))
    return out if rank == 0 else None


def layout_error(rank: int, world: int, layout: dict):
    """Build a mesh for a wrong layout; returns the error line (every rank must fail the same way)."""
    from gemmaforge.errors import ConfigError
    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.parallel.init import build_meta_model
    from gemmaforge.parallel.parallelize import parallelize

    try:
        model = build_meta_model(tiny_config())
        dims = ParallelDims(**layout)
        dims.validate(world, model.config)
        parallelize(model, dims.build_mesh("cpu"))
    except ConfigError as e:
        return str(e)
    return None


def grads_single(seed: int = 0, rows=None):
    """Gradients of the first step's loss (single process): {name: grad}."""
    import gemmaforge
    from gemmaforge.data import collate_rows

    model = gemmaforge.from_config(tiny_config(), seed=seed).train()
    rows = rows if rows is not None else make_rows(seed)
    batches = [collate_rows([r]) for r in rows[:ROWS_PER_STEP]]
    n_valid = sum(b["num_valid_labels"] for b in batches)
    for b in batches:
        (_loss_sum(model, b) / n_valid).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def grads_parallel(rank: int, world: int, layout: dict, seed: int = 0):
    from gemmaforge.data import collate_rows
    from gemmaforge.parallel.process import all_reduce_sum, shard_items
    from gemmaforge.parallel.cp import ContextParallel
    from gemmaforge.parallel.dims import parallel_state

    model, mesh = build_parallel(layout, seed)
    st = parallel_state(model)
    cp = ContextParallel(mesh["cp"]) if st.dims.cp > 1 else None
    rows = make_rows(seed)
    mine = shard_items(rows[:ROWS_PER_STEP], st.dp_rank, st.dims.dp_shard)
    batches = [collate_rows([r]) for r in mine]
    n_valid = all_reduce_sum(sum(b["num_valid_labels"] for b in batches), st.dp_group)
    for b in batches:
        (_loss_sum(model, b, cp) / n_valid).backward()
    out = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
    return out if rank == 0 else None


def resume_single(ckpt_dir: str, steps: int, start_step: int, seed: int = 0):
    """Resume a distributed checkpoint in ONE plain process (no process group) and train on."""
    import gemmaforge
    from gemmaforge.train.checkpointer import load_distributed
    from gemmaforge.data import collate_rows

    model = gemmaforge.from_config(tiny_config(), seed=seed + 123).train()  # different weights: must be overwritten
    opt = _optimizer(model)
    extra = load_distributed(ckpt_dir, model, opt)
    assert extra["step"] == start_step, extra
    rows = make_rows(seed)
    losses = []
    for s in range(start_step, start_step + steps):
        batches = [collate_rows([r]) for r in rows[s * ROWS_PER_STEP:(s + 1) * ROWS_PER_STEP]]
        n_valid = sum(b["num_valid_labels"] for b in batches)
        total = 0.0
        for b in batches:
            loss = _loss_sum(model, b) / n_valid
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_pipeline(rank: int, world: int, layout: dict, schedule: str = "1F1B", steps: int = STEPS, seed: int = 0):
    """One rank of a pipeline-parallel run; rank 0 returns (losses, merged full state dict)."""
    from gemmaforge.data import collate_rows
    from gemmaforge.parallel.process import all_reduce_sum, shard_items
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.grads import clip_grad_norm_
    from gemmaforge.parallel.init import build_meta_model, materialize
    from gemmaforge.parallel.parallelize import parallelize
    from gemmaforge.parallel.pp import Pipeline, row_segments
    from gemmaforge.parallel.state import full_state_dict

    dims = ParallelDims(**layout)
    mesh = dims.build_mesh("cpu")
    dims = dims.validate(world)
    n_mb = ROWS_PER_STEP // dims.dp_shard
    pipe = Pipeline(build_meta_model(tiny_config()), mesh, schedule, n_microbatches=n_mb, chunk_size=16)
    parallelize(pipe.module, mesh, ParallelConfig())
    materialize(pipe.module, "cpu", state_dict=initial_state(seed))  # every rank reads the full weights
    pipe.module.train()
    opt = _optimizer(pipe.module)
    dp_mesh = mesh["dp_shard"]
    rows = make_rows(seed)
    losses = []
    for s in range(steps):
        mine = shard_items(rows[s * ROWS_PER_STEP:(s + 1) * ROWS_PER_STEP], dp_mesh.get_local_rank(), dims.dp_shard)
        ids = torch.stack([r.input_ids for r in mine])
        labels = torch.stack([r.labels for r in mine])
        doc = torch.cat([row_segments(r.cu_seqlens, r.seq_len) for r in mine])
        n_valid = all_reduce_sum(sum(collate_rows([r])["num_valid_labels"] for r in mine), dp_mesh.get_group())
        loss = pipe.step(ids, doc, labels, n_valid)
        losses.append(all_reduce_sum(loss, dp_mesh.get_group()))
        pipe.sync_tied_grads()
        clip_grad_norm_(pipe.module.parameters(), 1.0, extra_owner_factor=pipe.owner_factor)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sd = full_state_dict(pipe.module)
    return (losses, sd) if rank == 0 else None


# ----------------------------------------------------------------------------- the trainer

def trainer_kwargs(out: str, **over):
    sys_path_tests()
    from test_train import ByteTok, corpus

    docs = corpus()
    base = dict(out=out, steps=4, lr=1e-3, eps=1e-4, warmup_steps=1, seq_len=32, batch_tokens=128, micro_batch_rows=1,
                eval_every=2, save_every=2, keep_last=2, progress=False, eval_rows=2, seed=1)
    base.update(over)
    return base, dict(tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:], log=lambda m: None)


def sys_path_tests():
    import sys
    from pathlib import Path

    p = str(Path(__file__).resolve().parents[1])
    if p not in sys.path:
        sys.path.insert(0, p)


MOE_PRESET = "gemma-4-tiny-moe"  # 6 experts, top-3, 4 layers (K=V full layers): the expert-parallel runs


def trainer_model(seed: int = 0, model: str = "gemma3"):
    """The trainer tests' tiny model: ``"gemma3"`` (tiny Gemma 3) or ``"moe"`` (tiny Gemma 4 MoE)."""
    import gemmaforge

    torch.manual_seed(seed)
    if model == "moe":
        cfg = gemmaforge.preset(MOE_PRESET, vocab_size=264, vocab_size_per_layer_input=264, sliding_window=16)
    else:
        cfg = tiny_config(vocab_size=264, sliding_window=16)
    return gemmaforge.from_config(cfg, seed=seed).train()


def run_trainer_single(out: str, model: str = "gemma3", **over):
    from gemmaforge.train import TrainConfig, Trainer, read_metrics

    cfg, kw = trainer_kwargs(out, **over)
    summary = Trainer(TrainConfig(**cfg), model=trainer_model(model=model), **kw).run()
    return summary, read_metrics(f"{out}/metrics.jsonl")


def run_trainers(rank: int, world: int, specs: list):
    """Several DistributedTrainer runs one after the other in ONE process group (one launch).

    ``specs``: dicts with ``out``, ``layout`` (ParallelDims kwargs), ``over`` (TrainConfig overrides, e.g.
    ``resume``) and optionally ``pcfg`` (ParallelConfig kwargs) and ``model`` (``trainer_model``'s
    choice: ``"gemma3"``, the default, or ``"moe"``). Rank 0 returns each run's
    ``(summary, metrics rows, logged lines)``; a run that raises a ConfigError (on every rank)
    returns ``("error", message)``.
    """
    from gemmaforge.parallel.process import make_distributed_trainer
    from gemmaforge.errors import ConfigError
    from gemmaforge.train import TrainConfig, read_metrics
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims

    results = []
    for spec in specs:
        cfg, kw = trainer_kwargs(spec["out"], **spec.get("over", {}))
        log: list = []
        kw["log"] = log.append
        pcfg = ParallelConfig(**spec["pcfg"]) if spec.get("pcfg") else None
        try:
            trainer = make_distributed_trainer(TrainConfig(**cfg), dims=ParallelDims(**spec["layout"]), pcfg=pcfg,
                                               model=trainer_model(model=spec.get("model", "gemma3"))
                                               if rank == 0 else None, **kw)
        except ConfigError as e:
            results.append(("error", str(e)))
            continue
        summary = trainer.run()
        results.append((summary, read_metrics(f"{spec['out']}/metrics.jsonl"), log) if rank == 0 else None)
        del trainer
    return results if rank == 0 else None


# ----------------------------------------------------------------------------- scoring and mixed precision

SCORE_CAP = 5.0  # final logit soft-capping for the scoring checks (Gemma 3 has none by default)
SCORE_TEMPERATURE = 0.7


def score_inputs(seed: int = 0):
    """Two packed rows (``ids [T]``, ``cu_seqlens``) and per-token weights of a scalar objective for each."""
    rows = make_rows(seed)[:2]
    g = torch.Generator().manual_seed(seed + 7)
    out = []
    for r in rows:
        w_lp, w_ent = torch.randn(2, r.seq_len, generator=g) / r.seq_len
        out.append((r.input_ids, r.cu_seqlens, w_lp, w_ent))
    return out


def score_rows(model, which):
    """``score`` of the rows ``which`` (no grad), then the gradients of their summed weighted objective.

    Returns ``([(logprobs, entropy, valid) per row], {name: full gradient})``.
    """
    from gemmaforge.rl.score import score

    inputs = score_inputs()
    kw = dict(temperature=SCORE_TEMPERATURE, return_entropy=True, chunk_size=7)
    per_row = []
    with torch.no_grad():
        for i in which:
            ids, cu, _, _ = inputs[i]
            o = score(model, ids, cu, **kw)
            per_row.append((o.logprobs, o.entropy, o.valid))
    for i in which:
        ids, cu, w_lp, w_ent = inputs[i]
        o = score(model, ids, cu, **kw)
        ((o.logprobs * w_lp).sum() + (o.entropy * w_ent).sum()).backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
    return per_row, grads


def score_and_mixed_precision(rank: int, world: int):
    """One launch, several checks (each layout builds its own meshes):

    * ``score`` under FSDP2 x 2 (each rank scores its own row) and under TP x 2 (soft-capped logits,
      temperature): per-token log-probs, entropies and the gradients of a weighted sum, for
      comparison with one process (every rank returns its results);
    * one FSDP2 x 2 training step with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32):
      loss, full fp32 gradients, the dtypes of the stored (sharded) parameters and gradients, and
      the largest weight change of the optimizer step.
    """
    from gemmaforge.data import collate_rows
    from gemmaforge.parallel.process import all_reduce_sum, shard_items
    from gemmaforge.parallel.dims import parallel_state
    from gemmaforge.parallel.grads import clip_grad_norm_

    out = {}
    # FSDP: data parallel, rank r scores row r (FSDP sums the gradients); TP: every rank scores both rows
    for name, layout, which in [("fsdp", dict(dp_shard=2), [rank]), ("tp", dict(dp_shard=1, tp=2), [0, 1])]:
        model, _ = build_parallel(layout, config_over=dict(final_logit_softcapping=SCORE_CAP))
        model.eval()
        out[name] = score_rows(model, which)
        del model

    model, _ = build_parallel(dict(dp_shard=2), pcfg=dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    st = parallel_state(model)
    opt = _optimizer(model)
    before = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    mine = shard_items(make_rows(0)[:ROWS_PER_STEP], st.dp_rank, st.dims.dp_shard)
    batches = [collate_rows([r]) for r in mine]
    n_valid = all_reduce_sum(sum(b["num_valid_labels"] for b in batches), st.dp_group)
    total = 0.0
    for b in batches:
        loss = _loss_sum(model, b) / n_valid
        loss.backward()
        total += float(loss.detach())
    total = all_reduce_sum(total, st.loss_group)
    dtypes = {(_local_dtype(p), _local_dtype(p.grad)) for p in model.parameters()}
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
    clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    moved = max((_full(p).detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    out["mixed_precision"] = dict(loss=total, grads=grads, dtypes=dtypes, moved=moved)
    return out


def _local_dtype(t):
    return (t.to_local() if hasattr(t, "to_local") else t).dtype


def score_single():
    """The one-process reference of ``score_and_mixed_precision``'s scoring checks."""
    import gemmaforge

    model = gemmaforge.from_config(tiny_config(final_logit_softcapping=SCORE_CAP), seed=0).eval()
    return score_rows(model, [0, 1])
