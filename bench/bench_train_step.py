"""Full fine-tune step of the embedded Gemma 3 270M: gemmaforge vs a plain transformers loop.

    .venv/bin/python bench/bench_train_step.py [--seq 512] [--steps 3] [--threads 2]

Each side runs in its own process (so peak resident memory is its own). Both stay loaded and the
parent alternates them step by step (one steps while the other waits idle), so a slow spell of this
shared machine hits both sides alike: two warm-up steps each, then the median of ``--steps`` timed
steps per side and the median ratio of back-to-back pairs. transformers: forward with labels and use_cache=False,
backward, AdamW step. gemmaforge: packed forward to hidden states, chunked linear+cross-entropy
(never the [T, vocab] logits), backward, fused AdamW step, the same as its Trainer does (including ``TiedEmbeddingGrad``,
``HeadGradBuffer`` and ``ReturnFreedMemory``).
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


def build_step(which: str, seq: int, threads: int, chunk: int = 0):
    """Load one side and return ``(step, cfg)``; ``step()`` runs one optimizer step, returns the loss."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from gemmaforge.formats.resolve import embedded_dir
    from gemmaforge.models.registry import load_config

    d = embedded_dir()
    ids = torch.randint(10, 200_000, (1, seq))
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
        from gemmaforge.ops.head_loss import chunked_cross_entropy
        from gemmaforge.cpu_policy import HeadGradBuffer, ReturnFreedMemory, TiedEmbeddingGrad
        from gemmaforge.train import TrainConfig
        from gemmaforge.train.optim import param_groups

        model = gemmaforge.from_pretrained("gemma-3-270m").train()
        if which == "gemmaforge-lora":
            from gemmaforge.adapters.lora import LoraConfig, apply_lora

            apply_lora(model, LoraConfig(rank=16))  # all seven projections of every layer
        opt = torch.optim.AdamW(param_groups(model, 0.0, False), lr=1e-5, fused=True)
        cu = torch.tensor([0, seq], dtype=torch.int32)
        labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
        # as the Trainer does on CPU: the tied table's lean gradient, and freed memory handed back
        tied = TiedEmbeddingGrad(model) if TiedEmbeddingGrad.applies(model) else None
        trim = ReturnFreedMemory.for_model(model)
        if trim is not None:
            trim.attach(model)
        chunk = chunk or TrainConfig().loss_chunk_size  # the Trainer's default unless --loss-chunk
        head_grad = HeadGradBuffer()  # the head's [V, H] gradient memory, kept from step to step

        def step():
            if tied is not None:
                leaf = tied.leaf(ids)
                h = model(inputs_embeds=leaf, cu_seqlens=cu, return_hidden=True)[0]
            else:
                h = model(ids, cu_seqlens=cu, return_hidden=True)[0]
            if trim is not None:
                trim()
            w = model.lm_head.weight
            loss = chunked_cross_entropy(h, w, labels, reduction="mean", chunk_size=chunk,
                                         **head_grad.loss_buffers(w, chunk))
            loss.backward()
            if tied is not None:
                tied.accumulate(ids, leaf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    return step, load_config(d)


def serve(which: str, seq: int, threads: int, chunk: int = 0) -> None:
    """Worker process: load, then run one step per ``step`` line on stdin (so that the parent can
    alternate the sides step by step), and report the peak RSS on ``done``."""
    step, cfg = build_step(which, seq, threads, chunk)
    print(json.dumps({"ready": which}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            loss = step()
            print(json.dumps({"t": time.perf_counter() - t0, "loss": loss}), flush=True)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps({"peak_rss": peak, "flops": step_flops(cfg, seq)}), flush=True)
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=0, help="loss chunk rows (default: TrainConfig's)")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--only", default=None, help="run one side only: gemmaforge or transformers")
    ap.add_argument("--lora", action="store_true", help="also LoRA rank 16 (all seven projections) vs full fine-tune")
    a = ap.parse_args()
    if a.worker:
        serve(a.worker, a.seq, a.threads, a.loss_chunk)
        return
    sides = [a.only] if a.only else ["gemmaforge", "transformers"] + (["gemmaforge-lora"] if a.lora else [])
    procs = {}
    for which in sides:  # loaded one after the other; each waits idle while another one steps
        procs[which] = subprocess.Popen([sys.executable, __file__, "--worker", which, "--seq", str(a.seq),
                                         "--threads", str(a.threads), "--loss-chunk", str(a.loss_chunk)],
                                        stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def reply(which: str) -> dict:
        p = procs[which]
        for line in p.stdout:  # skip anything a library printed to stdout
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{which} worker died (exit {p.wait()})")

    def ask(which: str, msg: str) -> dict:
        procs[which].stdin.write(msg + "\n")
        procs[which].stdin.flush()
        return reply(which)

    for which in sides:
        reply(which)  # loaded
    res = {w: {"times": [], "losses": []} for w in sides}
    for k in range(2 + a.steps):  # steps alternate between the sides: a slow spell hits both
        for which in sides:
            r = ask(which, "step")
            res[which]["losses"].append(r["loss"])
            if k >= 2:
                res[which]["times"].append(r["t"])
    for which in sides:
        res[which].update(ask(which, "done"))
        procs[which].wait()
        r = res[which]
        r["step_s"] = statistics.median(r["times"])
    for k, r in res.items():
        tps = a.seq / r["step_s"]
        print(f"{k:15s} step {r['step_s']:6.2f}s  {tps:6.1f} tokens/s  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  "
              f"first loss {r['losses'][0]:.4f}  ({r['flops'] / r['step_s'] / 1e9:.0f} GFLOP/s achieved)  "
              f"steps {' '.join(f'{t:.2f}' for t in r['times'])}")
    def compare(fast: dict, slow: dict, what: str, speed_goal: str, mem_goal: str) -> None:
        pairs = [b / a_ for a_, b in zip(fast["times"], slow["times"])]
        print(f"{what}: speed {slow['step_s'] / fast['step_s']:.2f}x of medians, {statistics.median(pairs):.2f}x "
              f"median of back-to-back pairs ({' '.join(f'{x:.2f}' for x in pairs)}) (goal {speed_goal}); "
              f"memory {fast['peak_rss'] / slow['peak_rss']:.2f}x (goal {mem_goal})")

    if "gemmaforge-lora" in res and "gemmaforge" in res:
        compare(res["gemmaforge-lora"], res["gemmaforge"], "LoRA r16 vs full fine-tune", ">= 1.2x", "<= 0.5x")
    if "gemmaforge" in res and "transformers" in res:
        g = res["gemmaforge"]
        compare(g, res["transformers"], "gemmaforge vs transformers", ">= 1.4x", "<= 0.7x")
        print(f"compute floor: {g['flops'] / 1e9:.0f} GFLOP per step; at 120 GFLOP/s = {g['flops'] / 120e9:.1f}s; "
              f"gemmaforge reaches {g['flops'] / 120e9 / g['step_s']:.0%} of that floor")


if __name__ == "__main__":
    main()
