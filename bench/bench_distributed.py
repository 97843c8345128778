"""Per-layout training step time and memory per rank (CPU, gloo, one thread per process).

    .venv/bin/python bench/bench_distributed.py                       # tiny model, every layout
    .venv/bin/python bench/bench_distributed.py --model gemma-3-270m --layouts single,dp_shard=2,tp=2 \
        --seq-len 128 --steps 2
    ... --out bench/results/distributed.md --append

For each layout the processes build the model on the meta device, parallelize it, materialise it
(``materialize(seed=0)``: identical weights in every layout), and run warm-up + timed AdamW steps
on packed rows (the trainer's loss: chunked cross-entropy sum / global valid tokens). Reported per
rank: median step time, the bytes of parameters + gradients + AdamW state this rank holds (local
shards, the number FSDP is meant to cut), and the process's peak RSS (``ru_maxrss``, includes the
~0.3 GB of the Python/torch runtime and transient all-gathered parameters).

No GPU: every number here is CPU/gloo. Step times on a 2-core machine shared with other jobs
measure overheads, not throughput; the MFU goal needs a GPU run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_layout(s: str) -> dict:
    if s == "single":
        return {}
    out = {}
    for part in s.split("+"):
        k, v = part.split("=")
        out[k] = int(v)
    return out


def layout_world(layout: dict) -> int:
    n = 1
    for v in layout.values():
        n *= v
    return n


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        loc = t.to_local() if hasattr(t, "to_local") else t
        key = (loc.data_ptr(), loc.numel())
        if key in seen:
            continue
        seen.add(key)
        total += loc.numel() * loc.element_size()
    return total


def _rows(seq_len: int, n_rows: int, vocab: int, seed: int = 0):
    from gemmaforge.data import Document
    from gemmaforge.data.packing import pack_documents

    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < seq_len * n_rows + seq_len:
        n = int(torch.randint(8, max(9, seq_len), (1,), generator=g))
        docs.append(Document(torch.randint(1, vocab, (n,), generator=g).tolist()))
        total += n
    return pack_documents(docs, seq_len, strategy="greedy")[:n_rows]


def worker(rank: int, world: int, model_name: str, layout: dict, seq_len: int, rows_per_step: int, steps: int,
           warmup: int, schedule: str):
    import gemmaforge
    from gemmaforge.data import collate_rows
    from gemmaforge.parallel.process import all_reduce_sum, shard_items
    from gemmaforge.ops.head_loss import chunked_cross_entropy
    from gemmaforge.parallel.cp import ContextParallel
    from gemmaforge.parallel.dims import ParallelConfig, ParallelDims
    from gemmaforge.parallel.grads import clip_grad_norm_
    from gemmaforge.parallel.init import build_meta_model, materialize
    from gemmaforge.parallel.parallelize import parallelize
    from gemmaforge.parallel.pp import Pipeline, row_segments

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = gemmaforge.preset(model_name)
    dims = ParallelDims(**(layout or {"dp_shard": 1})).validate(world, cfg, seq_len)
    mesh = dims.build_mesh("cpu")
    model = build_meta_model(cfg)
    pipe = None
    if dims.pp > 1:
        pipe = Pipeline(model, mesh, schedule, n_microbatches=rows_per_step // dims.dp_shard, chunk_size=512)
        model = pipe.module
    parallelize(model, mesh, ParallelConfig())
    materialize(model, "cpu", seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    cp = ContextParallel(mesh["cp"]) if dims.cp > 1 else None
    dp_mesh = mesh["dp_shard"]
    rows = _rows(seq_len, rows_per_step * (steps + warmup), cfg.vocab_size)
    times = []
    for s in range(steps + warmup):
        step_rows = shard_items(rows[s * rows_per_step:(s + 1) * rows_per_step], dp_mesh.get_local_rank(),
                                dims.dp_shard)
        batches = [collate_rows([r]) for r in step_rows]
        n_valid = all_reduce_sum(sum(b["num_valid_labels"] for b in batches), dp_mesh.get_group())
        torch.distributed.barrier()
        t0 = time.perf_counter()
        if pipe is not None:
            ids = torch.stack([r.input_ids for r in step_rows])
            labels = torch.stack([r.labels for r in step_rows])
            doc = torch.cat([row_segments(r.cu_seqlens, r.seq_len) for r in step_rows])
            pipe.step(ids, doc, labels, n_valid)
            pipe.sync_tied_grads()
            clip_grad_norm_(params, 1.0, extra_owner_factor=pipe.owner_factor)
        else:
            for b in batches:
                if cp is not None:
                    loss = cp.loss_sum(model, b, chunk_size=512)
                else:
                    h = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], return_hidden=True)
                    loss = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight,
                                                 b["labels"].reshape(-1), chunk_size=512, reduction="sum")
                (loss / n_valid).backward()
            clip_grad_norm_(params, 1.0)
        opt.step()
        state_bytes = {
            "params": _bytes(params),
            "grads": _bytes(p.grad for p in params),
            "optimizer": _bytes(v for st in opt.state.values() for v in st.values()
                                if isinstance(v, torch.Tensor) and v.dim() > 0),
        }
        opt.zero_grad(set_to_none=True)
        torch.distributed.barrier()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rank": rank, "step_s": statistics.median(times), "state_bytes": state_bytes,
            "peak_rss_mb": peak / 1024, "base_rss_mb": base_rss / 1024,
            "tokens_per_step": rows_per_step * seq_len}


def run(model_name: str, layout_s: str, args) -> list[dict]:
    from gemmaforge.parallel.process import launch

    layout = parse_layout(layout_s)
    world = layout_world(layout)
    return launch(worker, world, model_name, layout, args.seq_len, args.rows, args.steps, args.warmup,
                  args.schedule)


def table(model_name: str, results: dict, args) -> str:
    single = results.get("single")
    ref = single[0]["state_bytes"] if single else None
    ref_total = ref["params"] + ref["optimizer"] if ref else None
    lines = [f"### {model_name}: seq_len {args.seq_len}, {args.rows} rows/step, "
             f"{args.steps} timed steps after {args.warmup} warm-up, 1 thread per rank",
             "",
             "| layout | ranks | step (s, median, max over ranks) | params+optim state / rank (MB, max) "
             "| vs 1 process | +grads (MB) | peak RSS / rank (MB, max) |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        sb = [r["state_bytes"] for r in res]
        po = max(s["params"] + s["optimizer"] for s in sb)
        gr = max(s["grads"] for s in sb)
        ratio = f"{po / ref_total:.2f}x" if ref_total else "-"
        lines.append(f"| {name} | {len(res)} | {max(r['step_s'] for r in res):.3f} | {po / 2**20:.1f} | {ratio} "
                     f"| {gr / 2**20:.1f} | {max(r['peak_rss_mb'] for r in res):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-tiny")
    ap.add_argument("--layouts", default="single,dp_shard=2,tp=2,cp=2,pp=2,dp_shard=2+tp=2")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per optimizer step (global)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--schedule", default="1F1B")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {}
    for lay in args.layouts.split(","):
        t = time.time()
        results[lay] = run(args.model, lay, args)
        print(f"{args.model} {lay}: step {max(r['step_s'] for r in results[lay]):.3f}s "
              f"({time.time() - t:.0f}s wall)", file=sys.stderr, flush=True)
    md = table(args.model, results, args)
    print(md)
    if args.out:
        with open(args.out, "a") as f:
            f.write(md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
