"""Multi-process workers for tests/test_distributed.py (spawned by ``gemmaforge.parallel.process.launch``).

Every worker drives the production code: ``gemmaforge.train.Trainer`` (one class for every layout),
``gemmaforge.train.step.forward_backward`` for a step's gradients, the trainer's checkpoints. Nothing
here writes a training step, a loss normalisation or a parameter-group rule of its own: a layout is
only a ``ParallelDims`` / ``ParallelConfig`` handed to the Trainer, and the test compares what it
reports (metrics, exported weights, gradients before clipping) with the single-process Trainer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

SEQ_LEN = 32
STEPS = 4


def _tests_on_path():
    p = str(Path(__file__).resolve().parents[1])
    if p not in sys.path:
        sys.path.insert(0, p)


def trainer_config(out: str, **over):
    """The runs' TrainConfig: 4 steps of 4 packed rows of 32 tokens (2 micro-batches of 2 rows),
    evaluation and a checkpoint every 2 steps. Adam's first steps are ~sign(g): where |g| is near
    eps, fp32 rounding differences between layouts (reduction orders, ~1e-6 relative) would be
    amplified to ~lr; eps well above the rounding level keeps "same weights to 1e-5" a statement
    about the layouts. fp32 (not ``--dtype auto``, bf16 on a CPU with native bf16): the layouts are
    compared to 1e-5, far below bf16's rounding."""
    from gemmaforge.train import TrainConfig

    base = dict(out=out, steps=STEPS, lr=1e-3, eps=1e-4, warmup_steps=1, seq_len=SEQ_LEN, batch_tokens=128,
                micro_batch_rows=2, eval_every=2, save_every=2, keep_last=2, progress=False, eval_rows=2, seed=1,
                weight_decay=0.01, dtype="float32")
    base.update(over)
    return TrainConfig(**base)


MOE_PRESET = "gemma-4-tiny-moe"  # 6 experts, top-3, 4 layers (K=V full layers): the expert-parallel runs

MODELS = {
    # name: (preset, overrides) of the tiny models the runs train
    "gemma3": ("gemma-3-tiny", dict(vocab_size=264, sliding_window=16)),
    "mistral": ("mistral-tiny", dict(vocab_size=264, sliding_window=16)),
    "moe": (MOE_PRESET, dict(vocab_size=264, vocab_size_per_layer_input=264, sliding_window=16)),
    "e2b": ("gemma-4-tiny-e2b", dict(vocab_size=264, vocab_size_per_layer_input=264, sliding_window=16)),
}


def trainer_model(kind: str = "gemma3", seed: int = 0):
    import gemmaforge

    name, over = MODELS[kind]
    return gemmaforge.from_config(gemmaforge.preset(name, **over), seed=seed).train()


def trainer_inputs(log=None):
    """Tokenizer and documents of every run (the single-process training tests' synthetic corpus)."""
    _tests_on_path()
    from test_train import ByteTok, corpus

    docs = corpus()
    return dict(tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:], log=log or (lambda m: None))


def make_trainer(out: str, kind: str = "gemma3", layout: dict | None = None, pcfg: dict | None = None,
                 with_model: bool = True, log=None, **over):
    """The production Trainer for one run; under a layout rank 0 hands it the full model."""
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.train import Trainer

    cfg = trainer_config(out, **over)
    dims = ParallelDims(**layout) if layout is not None else None
    parallel = ParallelConfig(**pcfg) if pcfg else None
    model = trainer_model(kind) if with_model else None
    return Trainer(cfg, model=model, dims=dims, parallel=parallel, **trainer_inputs(log))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step_grads(trainer) -> tuple[dict, set]:
    """The next step's gradients, before clipping, from the production step (every parameter whole;
    collective) and the (parameter, gradient) dtypes as stored. Leaves the trainer's gradients unset
    and its data stream where it was."""
    from gemmaforge.train.data import RowStream
    from gemmaforge.train.step import forward_backward

    state = trainer.stream.state()
    forward_backward(trainer.model, trainer._micro_batches(), trainer.objective, trainer.layout)
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.grad is not None]
    grads = {n: _full(p.grad).detach().clone() for n, p in params}
    dtypes = {(_local_dtype(p), _local_dtype(p.grad)) for _, p in params}
    trainer.model.zero_grad(set_to_none=True)
    trainer.stream = RowStream(trainer.train_rows, trainer.cfg.seed, state["epoch"], state["cursor"])
    return grads, dtypes


def first_step_grads(trainer) -> dict:
    return step_grads(trainer)[0]


def run_single(out: str, kind: str = "gemma3", grads: bool = False, **over):
    """The single-process Trainer: ``(summary, metrics rows, first-step grads or None)``."""
    from gemmaforge.train import read_metrics

    g = first_step_grads(make_trainer(out + "-grads", kind, **over)) if grads else None
    summary = make_trainer(out, kind, **over).run()
    return summary, read_metrics(f"{out}/metrics.jsonl"), g


class _Recomputes:
    """Counts the forward calls of every decoder layer's MLP (twice per layer and micro-batch when the
    layer is checkpointed and recomputed in the backward)."""

    def __init__(self, model):
        from gemmaforge.parallel.checkpointing import unwrapped

        self.n = 0
        self.handles = [unwrapped(layer).mlp.register_forward_pre_hook(self._count)
                        for layer in model.model.layers.values()]

    def _count(self, *_):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _inject_nan(trainer, spec: dict):
    """A forward hook that makes ``spec["module"]``'s output NaN on rank ``spec["rank"]`` during step
    ``spec["step"]`` (1-based), the re-run that localises it included."""
    module = trainer.model.get_submodule(spec["module"])

    def hook(_m, _a, out):
        if trainer.step + 1 == spec["step"] and dist.get_rank() == spec["rank"]:
            return out * float("nan")
        return out

    return module.register_forward_hook(hook)


def run_trainers(rank: int, world: int, specs: list):
    """Several Trainer runs one after the other in ONE process group (one launch).

    ``specs``: dicts with ``out``, ``layout`` (ParallelDims kwargs), optional ``over`` (TrainConfig
    overrides, e.g. ``resume``), ``pcfg`` (ParallelConfig kwargs), ``model`` (a ``MODELS`` key),
    ``grads`` (also return the first step's gradients before clipping), ``recompute`` (count the
    decoder layers' forwards during one step, which is then the run's whole training), ``nan``
    (inject a NaN, see ``_inject_nan``), ``copy`` / ``truncate`` (rank 0 copies directories
    ``[src, dst]`` / halves files before the run starts). Rank 0 returns each run's dict (``summary``, ``metrics``,
    ``log``, ``grads``, ``forwards``) or ``{"error": message}`` for a run that raised a
    GemmaforgeError (on every rank).
    """
    from gemmaforge.errors import GemmaforgeError
    from gemmaforge.train import read_metrics

    import shutil

    results = []
    for spec in specs:
        log: list = []
        res: dict = {}
        if rank == 0:  # files a run starts from: copies of earlier runs' checkpoints, damaged ones
            for src, dst in spec.get("copy", []):
                shutil.copytree(src, dst)
            for path in spec.get("truncate", []):
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
        dist.barrier()
        try:
            kind = spec.get("model", "gemma3")
            make = lambda out: make_trainer(out, kind, spec["layout"], spec.get("pcfg"),  # noqa: E731
                                            with_model=rank == 0, log=log.append, **spec.get("over", {}))
            if spec.get("grads"):
                res["grads"] = first_step_grads(make(spec["out"] + "-grads"))
            trainer = make(spec["out"])
            if spec.get("recompute"):
                counter = _Recomputes(trainer.model)
                trainer.train_step()
                res["forwards"] = counter.n
                counter.remove()
            else:
                hook = _inject_nan(trainer, spec["nan"]) if spec.get("nan") else None
                res["summary"] = trainer.run()
                if hook is not None:
                    hook.remove()
                res["metrics"] = read_metrics(f"{spec['out']}/metrics.jsonl") if rank == 0 else None
            res["log"] = log
            del trainer
        except GemmaforgeError as e:
            res = {"error": str(e)}
        results.append(res)
    return results if rank == 0 else None


# ----------------------------------------------------------------------------- parallel models (no training)

def tiny_config(**over):
    import gemmaforge

    return gemmaforge.preset("gemma-3-tiny", **over)


def initial_state(seed: int = 0, **over):
    import gemmaforge

    model = gemmaforge.from_config(tiny_config(**over), seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_parallel(layout: dict, seed: int = 0, init: str = "load", config_over: dict | None = None,
                   pcfg: dict | None = None):
    """Meta-build the tiny model, parallelize it with ``layout`` (ParallelDims kwargs), materialise it."""
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.init import build_meta_model, materialize
    from gemmaforge.parallel.parallelize import parallelize

    dims = ParallelDims(**layout)
    mesh = dims.build_mesh("cpu")
    model = build_meta_model(tiny_config(**(config_over or {})))
    parallelize(model, mesh, ParallelConfig(**(pcfg or {})))
    if init == "load":
        sd = initial_state(seed, **(config_over or {})) if dist.get_rank() == 0 else {}
        materialize(model, "cpu", state_dict=sd)
    else:
        materialize(model, "cpu", seed=seed)
    return model.train(), mesh


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


# ----------------------------------------------------------------------------- scoring and mixed precision

SCORE_CAP = 5.0  # final logit soft-capping for the scoring checks (Gemma 3 has none by default)
SCORE_TEMPERATURE = 0.7


def make_rows(seed: int = 0, n_rows: int = 2):
    """Random documents packed (greedy, cut at row ends) into ``n_rows`` rows of SEQ_LEN with cu_seqlens."""
    from gemmaforge.data import Document
    from gemmaforge.data.packing import pack_documents

    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < SEQ_LEN * n_rows + 64:
        n = int(torch.randint(3, 40, (1,), generator=g))
        docs.append(Document(torch.randint(1, 512, (n,), generator=g).tolist()))
        total += n
    return pack_documents(docs, SEQ_LEN, strategy="greedy")[:n_rows]


def score_inputs(seed: int = 0):
    """Two packed rows (``ids [T]``, ``cu_seqlens``) and per-token weights of a scalar objective for each."""
    rows = make_rows(seed)
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


def score_layouts(rank: int, world: int):
    """``score`` under FSDP2 x 2 (rank r scores row r; FSDP sums the gradients) and TP x 2 (every rank
    scores both rows): per-token log-probs, entropies and the gradients of a weighted sum of them."""
    out = {}
    for name, layout, which in [("fsdp", dict(dp_shard=2), [rank]), ("tp", dict(dp_shard=1, tp=2), [0, 1])]:
        model, _ = build_parallel(layout, config_over=dict(final_logit_softcapping=SCORE_CAP))
        model.eval()
        out[name] = score_rows(model, which)
        del model
    return out


def score_single():
    """The one-process reference of ``score_layouts``."""
    import gemmaforge

    model = gemmaforge.from_config(tiny_config(final_logit_softcapping=SCORE_CAP), seed=0).eval()
    return score_rows(model, [0, 1])


def _local_dtype(t):
    return (t.to_local() if hasattr(t, "to_local") else t).dtype


def mixed_precision_step(rank: int, world: int, out: str):
    """One FSDP2 x 2 training step through the production Trainer with
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): its loss, full fp32 gradients before
    clipping, the dtypes of the stored (sharded) parameters and gradients, and the largest weight
    change of the optimizer step."""
    trainer = make_trainer(out, "gemma3", dict(dp_shard=2),
                           dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), with_model=rank == 0,
                           steps=1)
    before = {n: _full(p).detach().clone() for n, p in trainer.model.named_parameters()}
    grads, dtypes = step_grads(trainer)
    row = trainer.train_step()
    moved = max((_full(p).detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    return dict(loss=row["loss"], grads=grads, dtypes=dtypes, moved=moved) if rank == 0 else None
