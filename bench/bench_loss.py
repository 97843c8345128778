"""Benchmark naive vs chunked LM-head cross-entropy / log-probs (forward + backward).

Usage (defaults: Gemma 3 270M head, N=512 tokens, CPU fp32, 2 threads):

    PYTHONPATH=src python bench/bench_loss.py
    PYTHONPATH=src python bench/bench_loss.py --n 2048 --chunks 256 512 --what ce

Timing: all implementations run interleaved round-robin in one process (after
one warm-up call each), so that load from other processes hits them equally;
min and median wall time of forward+backward (gradients wrt hidden and weight)
are reported.  Memory: each configuration runs once in its own fresh process,
and the peak RSS (ru_maxrss) increase over the state right before the call
(inputs already allocated) is reported, plus on CUDA the peak allocated memory
increase.  ``cold`` is the time of that first call in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    # current RSS from /proc (Linux); ru_maxrss is the high-water mark
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_step(cfg: dict):
    import torch

    from gemmaforge.ops.head_loss import chunked_cross_entropy, chunked_logprobs, naive_cross_entropy, naive_logprobs

    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(0)
    n, h, v = cfg["n"], cfg["h"], cfg["v"]
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(dev, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.05).to(dev, dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    labels[: n // 16] = -100  # a few ignored tokens (prompt)
    softcap = cfg["softcap"]

    def step(what: str, chunk: int):
        if what == "ce":
            if chunk == 0:
                loss = naive_cross_entropy(hidden, weight, labels, softcap=softcap)
            else:
                loss = chunked_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_size=chunk)
        else:
            tgt = labels.clamp(min=0)
            if chunk == 0:
                lp, ent = naive_logprobs(hidden, weight, tgt, softcap=softcap, temperature=0.9, return_entropy=True)
            else:
                lp, ent = chunked_logprobs(
                    hidden, weight, tgt, softcap=softcap, temperature=0.9, chunk_size=chunk, return_entropy=True
                )
            loss = lp.sum() + 0.01 * ent.sum()
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step


def run_memory(cfg: dict) -> dict:
    """One forward+backward of one configuration in a fresh process."""
    import torch

    torch.set_num_threads(cfg["threads"])
    step = _make_step(cfg)
    base_rss = _rss_mb()
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = step(cfg["what"], cfg["chunk"])
    out = {"cold_s": time.perf_counter() - t0, "peak_rss_delta_mb": _maxrss_mb() - base_rss, "loss": loss}
    if cfg["device"] == "cuda":
        out["peak_alloc_delta_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    return out


def run_timing(cfg: dict) -> dict:
    """All implementations interleaved round-robin in one process (fair under noisy load)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    step = _make_step(cfg)
    keys = [(w, c) for w in cfg["whats"] for c in cfg["chunks"]]
    times = {f"{w}:{c}": [] for w, c in keys}
    for w, c in keys:  # warm-up
        step(w, c)
    for _ in range(cfg["reps"]):
        for w, c in keys:
            t0, c0 = time.perf_counter(), time.process_time()
            step(w, c)
            times[f"{w}:{c}"].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--h", type=int, default=640)
    ap.add_argument("--v", type=int, default=262144)
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--what", choices=["ce", "logprobs", "both"], default="ce")
    ap.add_argument("--no-timing", action="store_true", help="only the per-process memory runs")
    ap.add_argument("--memory", help=argparse.SUPPRESS)
    ap.add_argument("--timing", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory:
        print(json.dumps(run_memory(json.loads(args.memory))))
        return
    if args.timing:
        print(json.dumps(run_timing(json.loads(args.timing))))
        return

    whats = ["ce", "logprobs"] if args.what == "both" else [args.what]
    chunks = [0] + list(args.chunks)
    common = dict(n=args.n, h=args.h, v=args.v, threads=args.threads, softcap=args.softcap,
                  dtype=args.dtype, device=args.device)
    print(f"N={args.n} H={args.h} V={args.v} dtype={args.dtype} device={args.device} "
          f"threads={args.threads} softcap={args.softcap}")
    print(f"[N, V] fp32 logits alone = {args.n * args.v * 4 / 2**20:.0f} MiB; "
          f"[V, H] fp32 = {args.v * args.h * 4 / 2**20:.0f} MiB")

    def sub(flag: str, cfg: dict):
        proc = subprocess.run([sys.executable, __file__, flag, json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAILED {flag} {cfg}\n{proc.stderr[-2000:]}")
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    timing = None
    if not args.no_timing:
        timing = sub("--timing", dict(common, whats=whats, chunks=chunks, reps=args.reps))
    print(f"fwd+bwd time: {args.reps} interleaved reps after 1 warm-up each; memory: fresh process per row")
    print("wall = wall-clock seconds; cpu = process CPU seconds (all threads; less sensitive to other load)")
    print(f"{'what':9s} {'impl':12s} {'wall min':>8s} {'wall med':>8s} {'cpu min':>8s} {'cold (s)':>9s} "
          f"{'peak RSS +MiB':>14s} {'peak alloc +MiB':>16s} {'loss':>14s}")
    for what in whats:
        for chunk in chunks:
            r = sub("--memory", dict(common, what=what, chunk=chunk)) or {}
            ts = (timing or {}).get(f"{what}:{chunk}")
            tmin = f"{min(t[0] for t in ts):8.2f}" if ts else f"{'-':>8s}"
            tmed = f"{statistics.median(t[0] for t in ts):8.2f}" if ts else f"{'-':>8s}"
            tcpu = f"{min(t[1] for t in ts):8.2f}" if ts else f"{'-':>8s}"
            name = "naive" if chunk == 0 else f"chunked {chunk}"
            alloc = f"{r['peak_alloc_delta_mb']:.0f}" if "peak_alloc_delta_mb" in r else "-"
            print(f"{what:9s} {name:12s} {tmin} {tmed} {tcpu} {r.get('cold_s', float('nan')):9.2f} "
                  f"{r.get('peak_rss_delta_mb', float('nan')):14.0f} {alloc:>16s} {r.get('loss', float('nan')):14.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
