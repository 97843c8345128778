"""Full fine-tune step of the embedded Gemma 3 270M: gemmaforge vs a plain transformers loop.

    .venv/bin/python bench/bench_train_step.py [--seq 512] [--steps 3] [--threads 2]

Each side runs in its own fresh process (so peak resident memory is its own): two warm-up steps,
then the median of ``--steps`` timed steps. transformers: forward with labels and use_cache=False,
backward, AdamW step. gemmaforge: packed forward to hidden states, chunked linear+cross-entropy
(never the [T, vocab] logits), backward, fused AdamW step, the same as its Trainer does (including ``TiedEmbeddingGrad`` and
``keep_freed_memory_small``; ``--hf-mallopt`` gives transformers the same malloc setting).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time



def step_flops(cfg, T: int) -> float:
    """6 * N_matmul_params * T + attention (fwd+bwd = 3x fwd); the tied head counts as a matmul."""
    from bench_gpu_mfu import model_flops  # same counting, one document of T tokens

    return model_flops(cfg, [T])


def worker(which: str, seq: int, steps: int, threads: int, hf_mallopt: bool = False) -> dict:
    import torch

    from gemmaforge.train import keep_freed_memory_small

    if which != "transformers" or hf_mallopt:
        keep_freed_memory_small()  # what gemmaforge's Trainer does on CPU (see its docstring)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from gemmaforge.checkpoint.resolve import embedded_dir

    d = embedded_dir()
    ids = torch.randint(10, 200_000, (1, seq))
    times = []
    if which == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss)
    else:
        import gemmaforge
        from gemmaforge.loss import chunked_cross_entropy
        from gemmaforge.train import TiedEmbeddingGrad, TrainConfig, param_groups

        model = gemmaforge.from_pretrained("gemma-3-270m").train()
        if which == "gemmaforge-lora":
            from gemmaforge.transforms.lora import LoraConfig, apply_lora

            apply_lora(model, LoraConfig(rank=16))  # all seven projections of every layer
        opt = torch.optim.AdamW(param_groups(model, 0.0, False), lr=1e-5, fused=True)
        cu = torch.tensor([0, seq], dtype=torch.int32)
        labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
        tied = TiedEmbeddingGrad(model) if TiedEmbeddingGrad.applies(model) else None  # as the Trainer
        chunk = TrainConfig().loss_chunk_size  # the Trainer's default

        def step():
            if tied is not None:
                leaf = tied.leaf(ids)
                h = model(inputs_embeds=leaf, cu_seqlens=cu, return_hidden=True)[0]
            else:
                h = model(ids, cu_seqlens=cu, return_hidden=True)[0]
            loss = chunked_cross_entropy(h, model.head_weight(), labels, reduction="mean", chunk_size=chunk)
            loss.backward()
            if tied is not None:
                tied.accumulate(ids, leaf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    losses = []
    for k in range(2 + steps):
        t0 = time.perf_counter()
        losses.append(step())
        if k >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from gemmaforge.config import load_config

    cfg = load_config(d)
    return {"which": which, "step_s": statistics.median(times), "times": times, "peak_rss": peak,
            "first_loss": losses[0], "flops": step_flops(cfg, seq)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--only", default=None, help="run one side only: gemmaforge or transformers")
    ap.add_argument("--hf-mallopt", action="store_true",
                    help="also give the transformers process gemmaforge's malloc setting (keep_freed_memory_small)")
    ap.add_argument("--lora", action="store_true", help="also LoRA rank 16 (all seven projections) vs full fine-tune")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.seq, a.steps, a.threads, a.hf_mallopt)))
        return
    res = {}
    sides = [a.only] if a.only else ["gemmaforge", "transformers"] + (["gemmaforge-lora"] if a.lora else [])
    for which in sides:
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--seq", str(a.seq), "--steps",
                              str(a.steps), "--threads", str(a.threads)] + (["--hf-mallopt"] if a.hf_mallopt else []),
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{which} worker failed")
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])
    for k, r in res.items():
        tps = a.seq / r["step_s"]
        print(f"{k:13s} step {r['step_s']:6.2f}s  {tps:6.1f} tokens/s  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  "
              f"first loss {r['first_loss']:.4f}  ({r['flops'] / r['step_s'] / 1e9:.0f} GFLOP/s achieved)")
    if "gemmaforge-lora" in res and "gemmaforge" in res:
        lo, g = res["gemmaforge-lora"], res["gemmaforge"]
        print(f"LoRA r16 vs full fine-tune: speed {g['step_s'] / lo['step_s']:.2f}x (goal >= 1.2x), memory "
              f"{lo['peak_rss'] / g['peak_rss']:.2f}x (goal <= 0.5x)")
    if "gemmaforge" in res and "transformers" in res:
        g, t = res["gemmaforge"], res["transformers"]
        print(f"speed ratio {t['step_s'] / g['step_s']:.2f}x (goal >= 1.4x); memory ratio "
              f"{g['peak_rss'] / t['peak_rss']:.2f}x (goal <= 0.7x)")
        print(f"compute floor: {g['flops'] / 1e9:.0f} GFLOP per step; at 120 GFLOP/s = {g['flops'] / 120e9:.1f}s; "
              f"gemmaforge reaches {g['flops'] / 120e9 / g['step_s']:.0%} of that floor")


if __name__ == "__main__":
    main()
