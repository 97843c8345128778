"""Per-layout memory and step time of the production Trainer (CPU, gloo, one thread per process).

    # issue A: whole-process peak RSS of an FSDP2 x2 rank vs one process, real Gemma 3 270M, seq 512
    .venv/bin/python bench/bench_distributed.py --model gemma-3-270m --layouts single,dp_shard=2 \\
        --seq-len 512 --steps 3
    # every layout on the tiny model
    .venv/bin/python bench/bench_distributed.py
    ... --out bench/results/distributed.md (appends the markdown) --json results.json

Each layout runs in fresh processes (``single``: one spawned process without a process group;
otherwise ``gemmaforge.parallel.process.launch``), one after the other, never at once. Every process
builds ``gemmaforge.train.Trainer`` as a user would: ``single`` loads the model itself and gets the
CPU training policy (``cpu_policy.for_training``: kept head-gradient buffer, lean tied embedding,
heap trims); a layout passes ``dims=ParallelDims(...)``, rank 0 loads the model
(``gemmaforge.from_pretrained``'s loader; ``gemma-3-270m`` is the embedded real model, other names
are presets with random weights) and the Trainer shards it (``parallelize`` + ``materialize``). Then
``--steps`` calls of ``Trainer.train_step`` (the production step: forward, loss, backward, gradient
norm, clipping, AdamW, schedule) on packed rows of random tokens: every data-parallel rank runs one
``--seq-len`` row per step (``--rows-per-rank``), so each process does the same work per step in every
layout. No evaluation, checkpoint or export.

Reported per layout: the largest rank's whole-process peak RSS (``ru_maxrss``: everything the process
did, model loading included), the peak when the Trainer was built, the bytes of parameters + AdamW
state the rank holds (local shards), and the median step time. ``--compare`` names the layout whose
largest rank is divided by ``single``'s peak (the issue-A ratio), printed as one line at the end.

No GPU: every number is CPU/gloo; step times on a shared 2-core machine measure overheads, not
throughput.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
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
    for k, v in layout.items():
        if k != "ep":
            n *= v
    return n


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _local_bytes(tensors) -> int:
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


def _documents(n_tokens: int, vocab: int, seed: int = 0):
    """Random-token documents (8..600 tokens) totalling ``n_tokens``."""
    from gemmaforge.data import Document

    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(8, 600, (1,), generator=g))
        docs.append(Document(torch.randint(4, vocab, (n,), generator=g).tolist()))
        total += n
    return docs


def _vocab(model_name: str) -> int:
    if model_name == "gemma-3-270m":
        return 262_144
    import gemmaforge

    return gemmaforge.preset(model_name).vocab_size


def _load(model_name: str):
    """The model as the Trainer would load it: ``gemma-3-270m`` from the embedded checkpoint (real
    weights), a preset name with random weights."""
    import gemmaforge

    if model_name == "gemma-3-270m":
        from gemmaforge.formats.convert import load_any
        from gemmaforge.formats.resolve import resolve

        model, _ = load_any(resolve(model_name), dtype=torch.float32, device="cpu", with_tokenizer=False)
        return model
    return gemmaforge.from_config(gemmaforge.preset(model_name), seed=0)


class _Tok:
    """The Trainer only needs ``eos_id`` and ``save`` (no export runs here)."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def save(self, d):
        pass


def worker(rank: int, world: int, model_name: str, layout: dict, seq_len: int, rows_per_rank: int, steps: int,
           out_dir: str):
    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    base = _peak_bytes()
    dims = ParallelDims(**layout) if layout else None
    dp = (layout.get("dp_shard", 1) if layout else 1) or 1
    rows = rows_per_rank * max(dp, 1)
    if layout.get("pp", 1) > 1:
        rows = max(rows, layout["pp"] * max(dp, 1))  # 1F1B: at least pp micro-batches per pipeline
    cfg = TrainConfig(model=model_name, out=f"{out_dir}/rank{rank}", steps=steps, lr=1e-5, seq_len=seq_len,
                      batch_tokens=rows * seq_len, micro_batch_rows=1, eval_every=0, save_every=0, progress=False,
                      warmup_steps=1, val_fraction=0.0)
    docs = _documents(seq_len * rows * (steps + 1), _vocab(model_name))
    model = _load(model_name) if rank == 0 or dims is None else None
    tr = Trainer(cfg, model=model, tokenizer=_Tok(), train_docs=docs, val_docs=[], log=lambda m: None, dims=dims)
    del model
    built = _peak_bytes()
    times = []
    for _ in range(steps):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        t0 = time.perf_counter()
        row = tr.train_step()
        times.append(time.perf_counter() - t0)
        assert not row.get("skipped"), row
    state = _local_bytes(list(tr.model.parameters())) + _local_bytes(
        v for st in tr.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    tables = {n: type(m).__name__ for n, m in (("embed_tokens", tr.model.model.embed_tokens),
                                                ("lm_head", tr.model.lm_head)) if m is not None}
    return {"rank": rank, "peak_bytes": _peak_bytes(), "built_peak_bytes": built, "base_bytes": base,
            "state_bytes": state, "step_s": statistics.median(times[1:] or times), "loss": row["loss"],
            "tables": tables}


def _single_entry(q, args):
    try:
        q.put(("ok", worker(0, 1, *args)))
    except BaseException as e:  # report to the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_single(args: tuple) -> list[dict]:
    """One spawned process, no process group (the plain single-process Trainer)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_single_entry, args=(q, args))
    p.start()
    status, out = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(out)
    return [out]


def run(model_name: str, layout_s: str, args, out_dir: str) -> list[dict]:
    from gemmaforge.parallel.process import launch

    layout = parse_layout(layout_s)
    wargs = (model_name, layout, args.seq_len, args.rows_per_rank, args.steps, f"{out_dir}/{layout_s}")
    if not layout:
        return run_single(wargs)
    return launch(worker, layout_world(layout), *wargs, threads=1)


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                   .stdout.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"CPU {cpu} ({os.cpu_count()} cores visible), torch.backends.cpu.get_cpu_capability() = "
            f"{torch.backends.cpu.get_cpu_capability()}, {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def table(model_name: str, results: dict, args) -> str:
    gb = 1e9
    single = results.get("single")
    ref = single[0]["peak_bytes"] if single else None
    lines = [f"### {model_name}: seq_len {args.seq_len}, {args.rows_per_rank} row(s) per data-parallel rank per step, "
             f"{args.steps} Trainer steps, 1 thread per process",
             "",
             "| layout | ranks | tables (embed / head) | peak RSS, largest rank (GB) | vs 1 process "
             "| peak RSS per rank (GB) | peak when built (GB) | params + AdamW state / rank (GB) "
             "| step s (median, max rank) | loss (last) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        peak = max(r["peak_bytes"] for r in res)
        ratio = f"**{peak / ref:.2f}x**" if ref else "-"
        t = res[0]["tables"]
        per_rank = ", ".join(f"{r['peak_bytes'] / gb:.2f}" for r in res)
        lines.append(f"| {name} | {len(res)} | {t.get('embed_tokens', '-')} / {t.get('lm_head', '-')} "
                     f"| {peak / gb:.2f} | {ratio} | {per_rank} "
                     f"| {max(r['built_peak_bytes'] for r in res) / gb:.2f} "
                     f"| {max(r['state_bytes'] for r in res) / gb:.2f} | {max(r['step_s'] for r in res):.2f} "
                     f"| {res[0]['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-tiny", help="gemma-3-270m (the embedded real model) or a preset")
    ap.add_argument("--layouts", default="single,dp_shard=2,tp=2,cp=2,pp=2,dp_shard=2+tp=2")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rows-per-rank", type=int, default=1, help="rows per data-parallel rank per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compare", default="dp_shard=2", help="the layout whose largest rank is compared to single")
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import tempfile

    results = {}
    started = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="gf-bench-dist-") as out_dir:
        for lay in args.layouts.split(","):
            t = time.time()
            results[lay] = run(args.model, lay, args, out_dir)
            print(f"{args.model} {lay}: peak {max(r['peak_bytes'] for r in results[lay]) / 1e9:.2f} GB, step "
                  f"{max(r['step_s'] for r in results[lay]):.2f}s ({time.time() - t:.0f}s wall)", file=sys.stderr,
                  flush=True)
    cmd = "python bench/bench_distributed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = f"{started:%Y-%m-%d %H:%M %Z}; {machine()}\n\n`{cmd}`\n\n" + table(args.model, results, args)
    if "single" in results and args.compare in results:
        s = results["single"][0]["peak_bytes"]
        c = max(r["peak_bytes"] for r in results[args.compare])
        md += (f"\n{args.compare}: largest rank's whole-process peak RSS {c / 1e9:.2f} GB vs one process "
               f"{s / 1e9:.2f} GB = **{c / s:.2f}x**\n")
    print(md)
    if args.out:
        with open(args.out, "a") as f:
            f.write(md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
