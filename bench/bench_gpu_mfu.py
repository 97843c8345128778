"""Training throughput and MFU of a Gemma 3 model on one GPU: bf16 autocast, packed rows.

    python bench/bench_gpu_mfu.py [--preset gemma-3-1b] [--seq 4096] [--docs 4] [--steps 10] [--rows 1]
                                  [--configs sdpa,flash,flex,sdpa+compile,flash+compile,flex+compile] [--json out.json]

One optimizer step = the Trainer's step, through its functions: ``train.step.forward_backward``
(packed forward with ``cu_seqlens`` under bf16 autocast with fp32 master weights, ``CausalLMLoss``:
chunked linear+cross-entropy over the tied head in ``--loss-chunk`` token chunks, bf16 operands,
fp32 results; backward), the health check and clipping (``grad_norm_and_finite``, ``clip_grads_``)
and the fused AdamW of ``train.optim.build_optimizer``. Each config runs in its own process (a compile that stalls cannot take
the others down); each reports the median of ``--steps`` timed steps after 3 warm-up steps.

Backends: ``sdpa`` attends a packed row document by document (sliding layers with a dense window
mask per document); ``flash`` runs every document of the row in one varlen FlashAttention-2 call
(the flash-attn package if installed, else PyTorch's built-in kernel) with the window native;
``flex`` uses a block mask. ``+compile`` compiles each decoder block.

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs: 6 x (matmul
parameters incl. the tied head) x tokens + attention (QK^T and PV, forward x3), counted per
document and per layer with its sliding window, i.e. only the FLOPs the model needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM


def model_flops(cfg, doc_lens: list[int]) -> float:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    n = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h
    T = sum(doc_lens)
    attn = 0
    for t in cfg.layer_types:
        for L in doc_lens:
            w = cfg.window_for(t) or L
            keys = sum(min(k + 1, w) for k in range(L))
            attn += 2 * 2 * cfg.num_attention_heads * d * keys
    return 6 * n * T + 3 * attn


def doc_lengths(seq: int, docs: int) -> list[int]:
    import random

    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, seq), docs - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [seq])]


def worker(preset: str, seq: int, docs: int, steps: int, config: str, profile: str | None = None,
           rows: int = 1, loss_chunk: int = 1024) -> dict:
    import math

    import torch

    import gemmaforge
    from gemmaforge import cpu_policy
    from gemmaforge.train import CausalLMLoss, StepLayout, TrainConfig, forward_backward
    from gemmaforge.train.health import clip_grads_, grad_norm_and_finite
    from gemmaforge.train.optim import build_optimizer

    torch.set_float32_matmul_precision("high")  # fp32 matmuls (the LM-head loss) on TF32 tensor cores
    backend, _, comp = config.partition("+")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run of the script
    torch.manual_seed(0)
    model = gemmaforge.from_config(preset, device=dev).train()
    model.attn_backend = backend
    if comp == "compile":
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64  # one entry per block (layer index is a constant)
        from gemmaforge.parallel.compile import compile_blocks

        compile_blocks(model)
    cpu_policy.for_training(model)  # as the Trainer does (None on CUDA: nothing applied)
    cfg = model.config
    lens = doc_lengths(seq, docs) * rows  # ``rows`` packed rows of ``seq`` tokens, laid end to end
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    ids = torch.randint(10, cfg.vocab_size, (1, seq * rows), device=dev)
    labels = ids.roll(-1, dims=1).clone()
    labels[0, cu[1:].long() - 1] = -100  # no label across a document boundary (pre-shifted, as packing's)
    batches = [{"input_ids": ids, "labels": labels, "cu_seqlens": cu}]
    tcfg = TrainConfig(lr=1e-5)
    opt = build_optimizer(model, tcfg)  # fused AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    objective = CausalLMLoss(chunk_size=loss_chunk)
    layout = StepLayout.of(model)
    autocast = torch.bfloat16 if dev.type == "cuda" else None

    def step():
        """The Trainer's step (``Trainer.train_step``): forward_backward under bf16 autocast, the
        health check (global norm, finite), clipping, AdamW, zero_grad."""
        res = forward_backward(model, batches, objective, layout, autocast=autocast)
        gn, finite = grad_norm_and_finite(params, layout.owner_factor()) if math.isfinite(res.loss) \
            else (None, False)
        if finite and math.isfinite(res.loss):
            if tcfg.clip > 0 and gn is not None:
                clip_grads_(params, tcfg.clip, gn)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return res.loss

    t0 = time.perf_counter()
    losses = [float(step()) for _ in range(3)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    losses.append(float(loss))
    if profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step()
            sync()
        with open(f"{profile}.{config.replace('+', '_')}.txt", "w") as f:
            f.write(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    fl = model_flops(cfg, lens)
    st = statistics.median(times)
    return {"config": config, "device": name, "torch": torch.__version__, "preset": preset, "seq": seq,
            "rows": rows, "loss_chunk": loss_chunk, "doc_lens": lens, "step_s": st, "tokens_per_s": seq * rows / st, "tflops": fl / st / 1e12,
            "mfu": fl / st / peak if peak else None, "warmup_s": warm, "losses": losses,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0, "model_tflop_per_step": fl / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma-3-1b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=1, help="packed rows of --seq tokens per optimizer step")
    ap.add_argument("--configs", default="sdpa,flex,sdpa+compile,flex+compile")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per config")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--profile", default=None, help="write a per-kernel profile of one step to PREFIX.CONFIG.txt")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="tokens per LM-head loss chunk (CausalLMLoss; the Trainer's --loss-chunk-size)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.preset, a.seq, a.docs, a.steps, a.worker, a.profile, a.rows, a.loss_chunk)),
              flush=True)
        return
    results = []
    for c in a.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", c, "--preset", a.preset, "--seq", str(a.seq), "--docs",
               str(a.docs), "--steps", str(a.steps), "--rows", str(a.rows), "--loss-chunk", str(a.loss_chunk)] + (["--profile", a.profile] if a.profile else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            if out.returncode:
                r = {"config": c, "error": out.stderr.strip().splitlines()[-1][:300] if out.stderr else "failed"}
                print(out.stderr[-2000:], file=sys.stderr)
            else:
                r = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            r = {"config": c, "error": f"timed out after {a.timeout} s"}
        results.append(r)
        if "error" in r:
            print(f"{c:14s} ERROR {r['error']}", flush=True)
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{c:14s} rows {r['rows']} {r['step_s'] * 1e3:7.1f} ms/step  {r['tokens_per_s']:8.0f} tokens/s  "
                  f"{r['tflops']:6.1f} TFLOP/s  MFU {mfu}  peak {r['peak_mem_gib']:.1f} GiB  "
                  f"warm-up {r['warmup_s']:.0f} s  loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}  [{r['device']}]",
                  flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
