"""Peak memory of one packed row of T tokens: per-document SDPA (linear in T) vs quadratic baselines.

Usage (defaults: T = 2048 4096 8192, documents of uniform random length 64..1024, CPU fp32):

    PYTHONPATH=src python bench/bench_attention_memory.py
    PYTHONPATH=src python bench/bench_attention_memory.py --T 2048 4096 --backends sdpa eager --modes train

Backends compared (same model, same packed row, same loss):

  sdpa        the library's packed path: attention document by document (memory ~ sum L_i^2
              at most, never T^2);
  sdpa-dense  one SDPA call over the whole row with a single dense [T, T] boolean
              document/causal/window mask (registered here, at run time, as an extra
              backend: the "one big mask" alternative, no library file changed);
  eager       the library's reference backend: explicit fp32 [H, T, T] scores and
              probabilities under the dense mask.

Modes: ``infer`` = forward under ``torch.no_grad()``; ``train`` = forward, loss, backward
(parameter gradients included). ``--head hidden`` (default) stops at the final hidden states
(``return_hidden=True``, loss = mean of their projection on a fixed random vector) so the
numbers are the decoder stack's, where attention lives; ``--head logits`` adds the LM head
and token cross-entropy on the pre-shifted labels (a [T, vocab] fp32 term, linear in T, that
would otherwise dominate).

How peak memory is measured (CPU has no allocator statistics): every configuration runs in
a fresh subprocess, after building the model and the input row:

  live-tensor peak  a TorchDispatchMode sees every ATen op (forward and the autograd
                    engine's backward ops) and registers each output tensor's storage the
                    first time it appears (keyed by its StorageImpl, views/in-place outputs
                    count once), adding ``nbytes``; a weakref callback on the storage
                    subtracts it when the storage is actually freed. The running sum's
                    maximum is the peak of tensor bytes allocated during the step (model and
                    inputs, allocated before, are excluded). Buffers a kernel allocates
                    internally and never returns (e.g. SDPA's small per-thread scratch
                    blocks) are not seen, hence the second number:
  RSS peak          ru_maxrss of the subprocess minus its RSS right before the step: what
                    the OS actually had to provide (includes allocator slack, kernel
                    workspaces; it is a high-water mark of a fresh process, so runs do not
                    contaminate each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- measurement

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_tracker():
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        """Running sum of the bytes of storages created under the mode and still alive."""

        def __init__(self):
            super().__init__()
            self.live: dict[int, int] = {}
            self.cur = 0
            self.peak = 0

        def _free(self, key: int) -> None:
            self.cur -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                st = t.untyped_storage()
                key = st._cdata  # the StorageImpl: shared by views and in-place outputs
                if key in self.live:
                    continue
                n = st.nbytes()
                self.live[key] = n
                self.cur += n
                self.peak = max(self.peak, self.cur)
                # storages keep their Python object while the C++ storage lives, so the
                # callback fires when the memory is released
                weakref.finalize(st, self._free, key)
            return out

    return LiveTensorBytes()


def build(T: int, seed: int, args):
    import torch

    import gemmaforge
    from gemmaforge.data.packing import Document, pack_documents

    cfg = gemmaforge.preset(
        "gemma-3-tiny",
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, query_pre_attn_scalar=args.head_dim, sliding_window=args.window,
        # the packed row, not any document, is T long: the context check looks at the row
        max_position_embeddings=max(T, 1024),
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)],
    )
    model = gemmaforge.from_config(cfg, seed=0).train()
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=g))
        n = min(n, T - total)
        lengths.append(n)
        total += n
    docs = [Document(torch.randint(1, args.vocab, (n,), generator=g)) for n in lengths]
    rows = pack_documents(docs, T)
    assert len(rows) == 1 and rows[0].num_real_tokens == T, "documents must fill exactly one row"
    return model, rows[0], lengths


def register_dense_backend() -> None:
    """Extra backend 'sdpa-dense': one SDPA call with a dense [B, 1, T, Sk] boolean mask."""
    from gemmaforge.layers import attention as A

    def sdpa_dense(q, k, v, call, return_probs=False):
        mask = call.dense_mask(q.shape[0])
        return A._sdpa(q, k, v, mask, False, call.scale), None

    A.BACKENDS.setdefault("sdpa-dense", sdpa_dense)


def run_single(c: dict) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(c["threads"])
    register_dense_backend()
    args = argparse.Namespace(**c["model"])
    model, row, lengths = build(c["T"], c["seed"], args)
    ids, labels, cu = row.input_ids, row.labels, row.cu_seqlens
    train = c["mode"] == "train"
    probe = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def step():
        with torch.set_grad_enabled(train):
            if c["head"] == "logits":
                logits = model(ids, cu_seqlens=cu, attn_backend=c["backend"])
                loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
            else:
                hidden = model(ids, cu_seqlens=cu, attn_backend=c["backend"], return_hidden=True)
                loss = (hidden.float() @ probe).mean()  # a scalar that depends on every token
            if train:
                loss.backward()
        return float(loss)

    gc.collect()
    rss0, maxrss0 = _rss_bytes(), _maxrss_bytes()
    tracker = make_tracker()
    t0 = time.perf_counter()
    with tracker:
        loss = step()
    dt = time.perf_counter() - t0
    maxrss1 = _maxrss_bytes()
    return {
        "T": c["T"], "backend": c["backend"], "mode": c["mode"], "docs": len(lengths),
        "max_doc": max(lengths), "sum_L2": sum(n * n for n in lengths),
        "tensor_peak": tracker.peak, "rss_peak": maxrss1 - rss0, "maxrss_before_over_rss": maxrss0 - rss0,
        "seconds": dt, "loss": loss,
    }


# --------------------------------------------------------------------------- driver

def _fmt(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--backends", nargs="+", default=["sdpa", "sdpa-dense", "eager"])
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--head", default="hidden", choices=["hidden", "logits"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-gib", type=float, default=12.0,
                    help="skip eager configurations whose estimated score memory exceeds this")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.single:
        print(json.dumps(run_single(json.loads(args.single))))
        return

    model_kw = {k: getattr(args, k) for k in
                ("vocab", "hidden", "inter", "layers", "heads", "kv_heads", "head_dim", "window", "min_len", "max_len")}
    import torch

    print(f"# torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, threads={args.threads}, fp32")
    print(f"# model: hidden {args.hidden}, inter {args.inter}, {args.layers} layers (sliding/full alternating, "
          f"window {args.window}), heads {args.heads}/{args.kv_heads} kv, head_dim {args.head_dim}, vocab {args.vocab}")
    what = "final hidden states (decoder stack only)" if args.head == "hidden" else "LM head logits (CE)"
    print(f"# loss on: {what}")
    print(f"# one packed row of T tokens, documents of uniform random length {args.min_len}..{args.max_len} "
          f"(seed {args.seed}), one fresh subprocess per configuration")
    results = []
    for mode in args.modes:
        for T in args.T:
            for backend in args.backends:
                # eager: ~1 fp32 [H, T, T] tensor per layer saved for backward plus ~3 transient ones
                est = 4 * args.heads * T * T * ((args.layers + 3) if mode == "train" else 3)
                if backend == "eager" and est > args.max_gib * 2**30:
                    print(f"# skip eager T={T} {mode}: estimated {est / 2**30:.1f} GiB > --max-gib {args.max_gib}")
                    continue
                c = {"T": T, "backend": backend, "mode": mode, "head": args.head, "seed": args.seed,
                     "threads": args.threads, "model": model_kw}
                env = dict(os.environ)
                src = os.path.join(os.path.dirname(HERE), "src")
                env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", json.dumps(c)],
                                   capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    print(f"# FAILED T={T} {backend} {mode} (rc {p.returncode}): {p.stderr.strip()[-400:]}")
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"# {mode:5} T={T:5} {backend:10} tensors {_fmt(r['tensor_peak']):>13}  "
                      f"RSS {_fmt(r['rss_peak']):>13}"
                      f"  ({r['seconds']:.1f}s, {r['docs']} docs, loss {r['loss']:.4f})", flush=True)

    for mode in args.modes:
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        print()
        print(f"{'forward (no_grad)' if mode == 'infer' else 'forward + backward'}:")
        print()
        print("| T | docs | backend | peak tensor bytes | bytes / T | peak RSS increase | RSS / T | vs sdpa |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in rs:
            base = next((x for x in rs if x["T"] == r["T"] and x["backend"] == "sdpa"), None)
            ratio = f"{r['tensor_peak'] / base['tensor_peak']:.2f}x" if base else "-"
            print(f"| {r['T']} | {r['docs']} | {r['backend']} | {_fmt(r['tensor_peak'])} | "
                  f"{r['tensor_peak'] / r['T'] / 1024:,.1f} KiB | {_fmt(r['rss_peak'])} | "
                  f"{r['rss_peak'] / r['T'] / 1024:,.1f} KiB | {ratio} |")
        print()
        # marginal cost of one more token between consecutive T: constant when memory is linear
        # in T, doubling with every doubling of T when it is quadratic
        for b in args.backends:
            pts = sorted((r["T"], r["tensor_peak"]) for r in rs if r["backend"] == b)
            if len(pts) >= 2:
                steps = ", ".join(f"{t0}->{t1}: {(m1 - m0) / (t1 - t0) / 1024:,.1f} KiB/token"
                                  for (t0, m0), (t1, m1) in zip(pts, pts[1:]))
                print(f"- {b}: marginal tensor bytes per added token {steps}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
