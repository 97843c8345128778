"""Multi-process workers for tests/test_fsdp_memory.py (spawned by gemmaforge.parallel.process.launch).

FSDP2 keeps the ``[V, H]`` tables vocabulary-parallel (``gemmaforge.parallel.vocab``): these workers
run the production Trainer and the model's other entry points (full logits, ``score``, the head's
loss at every reduction) under a layout and return what the tests compare with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

VOCAB = 264  # the byte tokenizer's ids fit (bytes + 4 specials); divisible by 2 and 4


def _tests_on_path() -> None:
    p = str(Path(__file__).resolve().parents[1])
    if p not in sys.path:
        sys.path.insert(0, p)


def config(kind: str, **over):
    """The tiny model of ``kind``: ``"gemma3"`` (tied), ``"mistral"`` (untied head), ``"e2b"`` (Gemma 4
    with per-layer embeddings and KV sharing, tied)."""
    import gemmaforge

    if kind == "gemma3":
        return gemmaforge.preset("gemma-3-tiny", **{"vocab_size": VOCAB, "sliding_window": 16, **over})
    if kind == "mistral":
        return gemmaforge.preset("mistral-tiny", **{"vocab_size": VOCAB, **over})
    if kind == "e2b":
        return gemmaforge.preset("gemma-4-tiny-e2b", **{"vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
                                                        "sliding_window": 16, **over})
    raise ValueError(kind)


def model(kind: str, seed: int = 0, **over):
    import gemmaforge

    torch.manual_seed(seed)
    return gemmaforge.from_config(config(kind, **over), seed=seed).train()


def trainer_kwargs(out: str, **over):
    _tests_on_path()
    from test_train import ByteTok, corpus

    docs = corpus()
    base = dict(out=out, steps=4, lr=1e-3, eps=1e-4, warmup_steps=1, seq_len=32, batch_tokens=128, micro_batch_rows=1,
                eval_every=2, save_every=2, keep_last=2, progress=False, eval_rows=2, seed=1, loss_chunk_size=16,
                dtype="float32")  # layouts compared to 1e-5: fp32, not --dtype auto (bf16 where the CPU has it)
    base.update(over)
    return base, dict(tokenizer=ByteTok(), train_docs=docs[:34], val_docs=docs[34:], log=lambda m: None)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_single(out: str, kind: str, **over):
    """The single-process Trainer: ``(metrics rows, final state dict)``."""
    from gemmaforge.train import TrainConfig, Trainer, read_metrics

    cfg, kw = trainer_kwargs(out, **over)
    tr = Trainer(TrainConfig(**cfg), model=model(kind), **kw)
    tr.run()
    return read_metrics(f"{out}/metrics.jsonl"), _state(tr.model)


def _table_info(model) -> dict:
    """How the tables are held on this rank: class names, global and local shapes, the tie."""
    from torch.distributed.tensor import DTensor

    emb, head = model.model.embed_tokens, model.lm_head  # a pipeline stage may lack either
    info = {"embed": type(emb).__name__, "head": type(head).__name__,
            "tied": head is not None and emb is not None and head.weight is emb.weight}
    for name, w in (("embed", getattr(emb, "weight", None)), ("head", getattr(head, "weight", None))):
        if w is None:
            continue
        info[name + "_dtensor"] = isinstance(w, DTensor)
        info[name + "_shape"] = tuple(w.shape)
        info[name + "_local"] = tuple((w.to_local() if isinstance(w, DTensor) else w).shape)
    return info


def run_layouts(rank: int, world: int, specs: list):
    """Trainer runs one after the other in ONE process group. ``specs``: dicts with ``out``, ``kind``,
    ``layout`` (ParallelDims kwargs), ``over`` (TrainConfig overrides, e.g. ``resume``) and optionally
    ``pcfg`` (ParallelConfig kwargs). Rank 0 returns
    per run ``(metrics rows, final full state dict, table info, DCP global shapes)``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.state import full_state_dict
    from gemmaforge.train import TrainConfig, Trainer, read_metrics

    results = []
    for spec in specs:
        cfg, kw = trainer_kwargs(spec["out"], **spec.get("over", {}))
        pcfg = ParallelConfig(**spec["pcfg"]) if spec.get("pcfg") else None
        tr = Trainer(TrainConfig(**cfg), model=model(spec["kind"]) if rank == 0 else None,
                     dims=ParallelDims(**spec["layout"]), parallel=pcfg, **kw)
        info = _table_info(tr.model)
        tr.run()
        shapes = {k: tuple(v.shape) for k, v in get_model_state_dict(tr.model).items()}
        sd = full_state_dict(tr.model)
        results.append((read_metrics(f"{spec['out']}/metrics.jsonl"), sd, info, shapes) if rank == 0 else None)
        del tr
    return results if rank == 0 else None


# ----------------------------------------------------------------------------- what a step allocates

class _LargestTensor:
    """A TorchDispatchMode recording the largest tensor any op allocates (forward, backward, collectives'
    output buffers, the optimizer): outputs whose memory is not one of the op's inputs' (views and
    in-place results are not allocations); plain tensors only, so a DTensor op counts by its local shard."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self

        def ptr(t):
            try:
                return t.untyped_storage().data_ptr()
            except RuntimeError:  # no storage (e.g. FSDP's freed all-gather buffers)
                return None

        def storages(xs):
            return {ptr(x) for x in tree_flatten(xs)[0] if isinstance(x, torch.Tensor)}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                seen = storages((args, kwargs))
                out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.numel() > outer.numel \
                            and ptr(t) not in seen:
                        outer.numel, outer.shape, outer.op = t.numel(), tuple(t.shape), str(func)
                return out

        self.mode = Mode()
        self.numel, self.shape, self.op = 0, None, None

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def largest_in_step(rank: int, world: int, out: str, vocab: int):
    """FSDP2 x ``world`` Trainer steps of the tiny Gemma 3 with a ``vocab``-row tied table (so ``[V, H]``
    is far larger than any other tensor): the largest tensor allocated on this rank during a whole
    ``train_step`` (2 micro-batches, evaluation included), and, as the check's positive control, while
    ``lm_head.matrix()`` all-gathers the table."""
    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.train import TrainConfig, Trainer

    cfg, kw = trainer_kwargs(out, steps=2, eval_every=0, save_every=0, micro_batch_rows=1, batch_tokens=128)
    m = model("gemma3", vocab_size=vocab) if rank == 0 else None
    tr = Trainer(TrainConfig(**cfg), model=m, dims=ParallelDims(dp_shard=world), **kw)
    info = _table_info(tr.model)
    res = {"info": info}
    tr.train_step()  # the first step allocates AdamW's state (shard-sized): record a later one as well
    for name, fn in (("step", tr.train_step), ("eval", tr.evaluate)):
        with _LargestTensor() as rec:
            fn()
        res[name] = (rec.numel, rec.shape, rec.op)
    with torch.no_grad(), _LargestTensor() as rec:
        tr.model.lm_head.matrix()
    res["matrix"] = (rec.numel, rec.shape, rec.op)
    return res


# ----------------------------------------------------------------------------- logits, score, loss reductions

SOFTCAP = 5.0
TEMPERATURE = 0.7


def _rows(seed: int = 0, n: int = 2, seq: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, VOCAB, (seq - 3 * i,), generator=g) for i in range(n)]  # different lengths per rank
    return ids, [torch.randn(len(x), generator=g) for x in ids]


def _grads(model) -> dict:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _entry_points(model, which: list[int], kind: str) -> dict:
    """Full logits, ``score`` and the head's loss at every reduction for the rows ``which``, each with the
    gradients of a weighted sum of it (the rows' weights differ, so do the ranks' upstream gradients)."""
    from gemmaforge.rl.score import score

    ids, weights = _rows()
    out = {}

    def run(name, fn):
        model.zero_grad(set_to_none=True)
        vals = []
        total = 0.0
        for i in which:
            v, obj = fn(i)
            vals.append(v.detach().clone())
            total = total + obj
        total.backward()
        out[name] = (vals, _grads(model))

    def logits(i):
        z = model(ids[i][None])[0]
        return z, (z.float().square().mean(-1) * weights[i]).sum()

    def scored(i):
        o = score(model, ids[i], temperature=TEMPERATURE, return_entropy=True, chunk_size=5)
        return torch.stack([o.logprobs, o.entropy]), (o.logprobs * weights[i]).sum() + o.entropy.sum() * 0.1

    def loss(reduction, scale_by_row):
        def f(i):
            h = model(ids[i][None], return_hidden=True)[0]
            y = torch.roll(ids[i], -1)
            y[::4] = -100  # ignored labels
            v = model.lm_head.cross_entropy(h, y, chunk_size=4, reduction=reduction)
            if reduction == "none":
                return v, (v * weights[i]).sum()
            return v, v * (1.0 + i if scale_by_row else 1.0)
        return f

    run("logits", logits)
    run("score", scored)
    run("ce_sum", loss("sum", False))
    run("ce_sum_unequal", loss("sum", True))  # each rank's loss weighted differently: recompute path
    run("ce_mean", loss("mean", False))  # different valid counts per rank
    run("ce_none", loss("none", False))
    with torch.no_grad():
        out["ce_no_grad"] = [model.lm_head.cross_entropy(model(ids[i][None], return_hidden=True)[0],
                                                         torch.roll(ids[i], -1), chunk_size=4) for i in which]
    return out


def entry_points_single(kind: str):
    m = model(kind, final_logit_softcapping=SOFTCAP) if kind != "mistral" else model(kind)
    return _entry_points(m, [0, 1], kind)


def entry_points_fsdp(rank: int, world: int, kind: str):
    """Under FSDP2 x 2: rank r runs row r (FSDP and the tables sum the gradients over the ranks)."""
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.init import build_meta_model, materialize
    from gemmaforge.parallel.parallelize import parallelize

    over = dict(final_logit_softcapping=SOFTCAP) if kind != "mistral" else {}
    full = _state(model(kind, **over)) if rank == 0 else {}
    meta = build_meta_model(config(kind, **over))
    parallelize(meta, ParallelDims(dp_shard=world), ParallelConfig())
    materialize(meta, "cpu", state_dict=full)
    meta.train()
    res = _entry_points(meta, [rank], kind)
    res["info"] = _table_info(meta)
    return res
