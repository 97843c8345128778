"""Training throughput: packed rows (cu_seqlens) vs padded batches, forward + backward.

Usage (defaults: 32 documents, log-uniform lengths 16..1024, seq_len 2048, CPU fp32, 2 threads):

    PYTHONPATH=src python bench/bench_packing.py
    PYTHONPATH=src python bench/bench_packing.py --reps 7 --seq-len 1024 --docs 64

One model, one set of documents, one process. Each repetition runs, interleaved, every
layout over the *same* documents (so drift of a shared machine hits all of them alike):

  padded-global  pad_documents() of all documents (right padding, S = longest document),
                 fed in micro-batches of --micro rows with attention_mask (a classic
                 "pad the batch to its longest sequence" loader);
  padded-micro   every micro-batch of --micro documents (in input order) padded to its own
                 longest document (a loader padding each micro-batch separately: the
                 stronger padded baseline);
  packed         pack_documents(..., seq_len) (first-fit-decreasing), one row per forward
                 with cu_seqlens (B = 1).

Loss: summed token cross-entropy over the pre-shifted labels divided by the number of
labels in the whole batch, so all layouts compute the same loss and the same gradients
(checked before timing). Throughput = real tokens (documents' tokens, no padding) per
second of forward + backward (+ zero_grad), median over --reps after --warmup.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import gemmaforge
from gemmaforge.data.packing import Document, pack_documents, packing_stats, pad_documents


def make_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """Seeded log-uniform lengths in [lo, hi]: many short documents, a long tail."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    lens = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().long().clamp(lo, hi)
    return lens.tolist()


def make_docs(lengths: list[int], vocab: int, seed: int) -> list[Document]:
    g = torch.Generator().manual_seed(seed + 1)
    # ids from 1: 0 is the pad id (its embedding row is the padding_idx)
    return [Document(torch.randint(1, vocab, (n,), generator=g)) for n in lengths]


def build_model(args):
    cfg = gemmaforge.preset(
        "gemma-3-tiny",
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, query_pre_attn_scalar=args.head_dim, sliding_window=args.window,
        max_position_embeddings=max(4096, args.seq_len, args.max_len),
        layer_types=["sliding_attention" if (i % 2 == 0) else "full_attention" for i in range(args.layers)],
    )
    model = gemmaforge.from_config(cfg, seed=0)
    model.train()
    return model, cfg


def make_batches(docs, args):
    """layout name -> list of forward kwargs dicts (each with 'labels')."""
    out = {}
    full = pad_documents(docs)
    out["padded-global"] = [
        {"input_ids": full["input_ids"][i:i + args.micro], "attention_mask": full["attention_mask"][i:i + args.micro],
         "labels": full["labels"][i:i + args.micro]}
        for i in range(0, len(docs), args.micro)
    ]
    out["padded-micro"] = []
    for i in range(0, len(docs), args.micro):
        b = pad_documents(docs[i:i + args.micro])
        out["padded-micro"].append(b)
    rows = pack_documents(docs, args.seq_len)
    out["packed"] = [{"input_ids": r.input_ids, "cu_seqlens": r.cu_seqlens, "labels": r.labels} for r in rows]
    return out, full, rows


def slots(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


def run_step(model, batches, n_labels: int, backend: str) -> float:
    """Forward + backward over all micro-batches (gradient accumulation); returns the loss."""
    total = 0.0
    for b in batches:
        kw = {k: v for k, v in b.items() if k != "labels"}
        logits = model(attn_backend=backend, **kw)
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, V).float(), b["labels"].reshape(-1),
                               ignore_index=-100, reduction="sum") / n_labels
        loss.backward()
        total += float(loss.detach())
    return total


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=2048, help="packed row length")
    ap.add_argument("--micro", type=int, default=4, help="rows per padded micro-batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="sdpa", choices=["sdpa", "eager", "flex"])
    ap.add_argument("--layouts", nargs="+", default=["padded-global", "padded-micro", "packed"])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--no-check", action="store_true", help="skip the loss/gradient equality check")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    lengths = make_lengths(args.docs, args.min_len, args.max_len, args.seed)
    docs = make_docs(lengths, args.vocab, args.seed)
    model, cfg = build_model(args)
    batches, full, rows = make_batches(docs, args)
    batches = {k: batches[k] for k in args.layouts}
    n_tokens = sum(lengths)
    n_labels = int((full["labels"] != -100).sum())
    n_params = sum(p.numel() for p in model.parameters())

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, backend={args.backend}, fp32")
    print(f"# model: hidden {cfg.hidden_size}, inter {cfg.intermediate_size}, layers {cfg.num_hidden_layers} "
          f"{cfg.layer_types}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}, "
          f"vocab {cfg.vocab_size}, window {cfg.sliding_window}, {n_params / 1e6:.2f}M params")
    srt = sorted(lengths)
    print(f"# {args.docs} documents, log-uniform {args.min_len}..{args.max_len} (seed {args.seed}): "
          f"{n_tokens} tokens, min {srt[0]}, median {srt[len(srt) // 2]}, max {srt[-1]}, labels {n_labels}")
    st = packing_stats(rows)
    print(f"# packing (ffd, seq_len {args.seq_len}): {st}")
    for name, bs in batches.items():
        s = slots(bs)
        print(f"#   {name:<14} {len(bs):>2} forwards, {s:>6} token slots, efficiency {n_tokens / s:6.1%}")

    if not args.no_check:
        ref_loss, ref_g = None, None
        for name, bs in batches.items():
            model.zero_grad(set_to_none=True)
            loss = run_step(model, bs, n_labels, args.backend)
            g = grads(model)
            if ref_loss is None:
                ref_loss, ref_g, ref_name = loss, g, name
                print(f"# check: loss {loss:.6f} ({name})")
            else:
                err = max(float((a - b).abs().max() / (b.abs().max() + 1e-30)) for a, b in zip(g, ref_g))
                print(f"# check: loss {loss:.6f} ({name}), |dloss| {abs(loss - ref_loss):.2e}, "
                      f"max rel grad diff vs {ref_name} {err:.2e}")
                if abs(loss - ref_loss) > 1e-4 * abs(ref_loss) or err > 1e-3:
                    print("# WARNING: layouts disagree")

    # wall: what a training loop sees. cpu: process CPU seconds (all threads), far less
    # sensitive to other processes competing for the cores (with 1 thread it is the work done;
    # with more, OpenMP spin-waiting is included).
    wall: dict[str, list[float]] = {k: [] for k in batches}
    cpu: dict[str, list[float]] = {k: [] for k in batches}
    for rep in range(args.warmup + args.reps):
        this = {}
        for name, bs in batches.items():
            model.zero_grad(set_to_none=True)
            c0, t0 = time.process_time(), time.perf_counter()
            run_step(model, bs, n_labels, args.backend)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            this[name] = dt
            if rep >= args.warmup:
                wall[name].append(dt)
                cpu[name].append(dc)
        print(f"# rep {rep}{' (warm-up)' if rep < args.warmup else ''}: "
              + ", ".join(f"{k} {v:.2f}s" for k, v in this.items()), flush=True)

    print()
    print(f"median of {args.reps} repetitions after {args.warmup} warm-up; "
          f"each = fwd+bwd over all {args.docs} documents")
    print()
    print("| layout | forwards | token slots | pad efficiency | wall s (min..max) | real tok/s (wall) "
          "| CPU s | real tok/CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    mw, mc = {}, {}
    for name in batches:
        mw[name], mc[name] = statistics.median(wall[name]), statistics.median(cpu[name])
        s = slots(batches[name])
        print(f"| {name} | {len(batches[name])} | {s} | {n_tokens / s:.1%} | {mw[name]:.2f} "
              f"({min(wall[name]):.2f}..{max(wall[name]):.2f}) | {n_tokens / mw[name]:,.0f} | {mc[name]:.2f} | "
              f"{n_tokens / mc[name]:,.0f} |")
    print()
    if "packed" in mw:
        for name in mw:
            if name != "packed":
                print(f"throughput ratio packed / {name}: {mw[name] / mw['packed']:.2f}x (wall), "
                      f"{mc[name] / mc['packed']:.2f}x (CPU time)")
    print("raw wall s: " + "; ".join(f"{k}: " + ", ".join(f"{t:.2f}" for t in v) for k, v in wall.items()))
    print("raw CPU s:  " + "; ".join(f"{k}: " + ", ".join(f"{t:.2f}" for t in v) for k, v in cpu.items()))


if __name__ == "__main__":
    main()
