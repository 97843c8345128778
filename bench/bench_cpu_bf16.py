"""CPU bf16 autocast vs fp32: the production full fine-tune step of the embedded Gemma 3 270M.

    .venv/bin/python bench/bench_cpu_bf16.py [--seq 512] [--steps 5] [--threads 2] [--clip]

Two worker processes load the same model: ``fp32`` (``forward_backward(..., autocast=None)``, the
step the Trainer ran on CPU before ``--dtype auto`` looked for native bf16) and ``bf16``
(``autocast=torch.bfloat16``, what ``cpu_policy.training_dtype("auto", cpu)`` picks where the CPU
multiplies bf16 natively). Each step is the Trainer's, from its own parts, as in
``bench_train_step._trainer_step``: ``cpu_policy.for_training`` (CPUHead with kept buffers,
LeanTiedEmbedding, trims), ``build_optimizer`` (fused AdamW on the fp32 weights), the LR schedule,
``forward_backward`` with ``CausalLMLoss``; ``--clip`` adds the health check and clipping. Both
stay loaded and the parent alternates them step by step (the side that goes first alternating too),
so a slow spell of this shared machine hits both alike: two warm-up steps each, then the median of
``--steps`` timed steps per side and the median ratio of back-to-back pairs. The first line names
the machine (lscpu model, ATen's CPU capability, the native-bf16 flags, ``native_bf16()``).

``--profile DTYPE`` instead profiles one step of one side (torch.profiler, CPU) and prints the ops
by self time.
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

SIDES = ("fp32", "bf16")


def machine() -> str:
    import torch

    from gemmaforge import cpu_policy
    from gemmaforge.ops.cpu_caps import _bf16_probe

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = "unknown"
    flags = cpu_policy.cpu_bf16_flags()
    return (f"CPU {cpu} ({os.cpu_count()} cores visible), torch.backends.cpu.get_cpu_capability() = "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 flags: {', '.join(flags) or 'none'}, "
            f"native_bf16() = {cpu_policy.native_bf16()}, fp32/bf16 probe matmul {_bf16_probe():.2f}x, "
            f"torch {torch.__version__}")


def build_step(side: str, seq: int, threads: int, clip: bool = False):
    """The production Trainer's single-process CPU step with ``side``'s autocast (see the module doc);
    ``step()`` runs one optimizer step and returns the loss, ``step.parts`` the seconds of its parts."""
    import math

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from gemmaforge import cpu_policy
    from gemmaforge.data import Document, collate_rows, pack_documents
    from gemmaforge.formats.convert import load_any
    from gemmaforge.formats.resolve import resolve
    from gemmaforge.train import CausalLMLoss, StepLayout, TrainConfig, forward_backward
    from gemmaforge.train.health import clip_grads_, grad_norm_and_finite
    from gemmaforge.train.optim import build_optimizer, lr_lambda

    ids = torch.randint(10, 200_000, (1, seq))[0]
    cfg = TrainConfig(lr=1e-5, seq_len=seq, batch_tokens=seq, micro_batch_rows=1,
                      dtype="float32" if side == "fp32" else "bfloat16")
    cfg.validate()
    autocast = cpu_policy.training_dtype(cfg.dtype, torch.device("cpu"))
    model, _ = load_any(resolve(cfg.model), dtype=torch.float32, device="cpu", with_tokenizer=False)
    model.train()
    model.attn_backend = cfg.attn_backend
    policy = cpu_policy.for_training(model)
    if policy is None:
        raise SystemExit("cpu_policy.for_training applied nothing (not a CPU model?)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    objective = CausalLMLoss(chunk_size=cfg.loss_chunk_size)
    layout = StepLayout.of(model)
    batches = [collate_rows(pack_documents([Document(ids)], seq))]

    def step():
        t0 = time.perf_counter()
        res = forward_backward(model, batches, objective, layout, autocast=autocast)
        t1 = time.perf_counter()
        gn, finite = grad_norm_and_finite(params, layout.owner_factor()) if clip and math.isfinite(res.loss) \
            else (None, math.isfinite(res.loss))
        ok = finite and math.isfinite(res.loss)
        if ok and cfg.clip > 0 and gn is not None:
            clip_grads_(params, cfg.clip, gn)
            float(gn)
        t2 = time.perf_counter()
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        t3 = time.perf_counter()
        if not ok:
            raise SystemExit(f"non-finite step (loss {res.loss})")
        step.parts = {"fwd_bwd": t1 - t0, "norm_clip": t2 - t1, "optim": t3 - t2}
        return res.loss

    step.parts = {}
    step.model = model
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights on both sides
    return step


def serve(side: str, seq: int, threads: int, clip: bool) -> None:
    step = build_step(side, seq, threads, clip)
    print(json.dumps({"ready": side}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            loss = step()
            t = time.perf_counter() - t0
            print(json.dumps({"t": t, "loss": loss, "parts": step.parts}), flush=True)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps({"peak_rss": peak}), flush=True)
            return


def profile(side: str, seq: int, threads: int, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    step = build_step(side, seq, threads)
    for _ in range(2):
        step()
    with prof_ctx(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        t = time.perf_counter() - t0
    print(f"{side}: step {t:.2f}s parts {step.parts}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    del torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clip", action="store_true", help="also the Trainer's health check and clipping")
    ap.add_argument("--worker", default=None, choices=SIDES)
    ap.add_argument("--profile", default=None, choices=SIDES, help="profile one step of one side instead")
    ap.add_argument("--rows", type=int, default=40, help="--profile: rows of the table")
    a = ap.parse_args()
    if a.worker:
        serve(a.worker, a.seq, a.threads, a.clip)
        return
    if a.profile:
        profile(a.profile, a.seq, a.threads, a.rows)
        return
    print(machine(), flush=True)
    procs = {}
    for side in SIDES:
        cmd = [sys.executable, __file__, "--worker", side, "--seq", str(a.seq), "--threads", str(a.threads)] + \
            (["--clip"] if a.clip else [])
        procs[side] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def reply(side: str) -> dict:
        p = procs[side]
        for line in p.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{side} worker died (exit {p.wait()})")

    def ask(side: str, msg: str) -> dict:
        procs[side].stdin.write(msg + "\n")
        procs[side].stdin.flush()
        return reply(side)

    for side in SIDES:
        reply(side)
    res = {s: {"times": [], "losses": [], "parts": []} for s in SIDES}
    for k in range(2 + a.steps):
        order = SIDES if k % 2 == 0 else SIDES[::-1]  # who goes first alternates too
        for side in order:
            r = ask(side, "step")
            res[side]["losses"].append(r["loss"])
            if k >= 2:
                res[side]["times"].append(r["t"])
                res[side]["parts"].append(r["parts"])
    for side in SIDES:
        res[side].update(ask(side, "done"))
        procs[side].wait()
        res[side]["step_s"] = statistics.median(res[side]["times"])
    for side, r in res.items():
        parts = "  ".join(f"{n} {statistics.median(p[n] for p in r['parts']):.3f}s" for n in r["parts"][0])
        print(f"{side:5s} step {r['step_s']:6.2f}s  {a.seq / r['step_s']:6.1f} tokens/s  peak RSS "
              f"{r['peak_rss'] / 2**30:5.2f} GiB  losses {' '.join(f'{x:.4f}' for x in r['losses'])}  "
              f"steps {' '.join(f'{t:.2f}' for t in r['times'])}  ({parts})")
    f, b = res["fp32"], res["bf16"]
    pairs = [x / y for x, y in zip(f["times"], b["times"])]
    fb = [x["fwd_bwd"] / y["fwd_bwd"] for x, y in zip(f["parts"], b["parts"])]
    print(f"bf16 vs fp32: speed {f['step_s'] / b['step_s']:.2f}x of medians, {statistics.median(pairs):.2f}x median "
          f"of back-to-back pairs ({' '.join(f'{x:.2f}' for x in pairs)}); forward+backward alone "
          f"{statistics.median(fb):.2f}x (pairs); memory {b['peak_rss'] / f['peak_rss']:.2f}x; "
          f"first loss {b['losses'][0]:.4f} vs {f['losses'][0]:.4f} "
          f"({(b['losses'][0] - f['losses'][0]) / f['losses'][0]:+.2%})")


if __name__ == "__main__":
    main()
