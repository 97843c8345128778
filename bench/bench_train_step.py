"""Full fine-tune step of the embedded Gemma 3 270M: gemmaforge vs a plain transformers loop.

    .venv/bin/python bench/bench_train_step.py [--seq 512] [--steps 3] [--threads 2]

Each side runs in its own process (so peak resident memory is its own). Both stay loaded and the
parent alternates them step by step (one steps while the other waits idle), so a slow spell of this
shared machine hits both sides alike: two warm-up steps each, then the median of ``--steps`` timed
steps per side and the median ratio of back-to-back pairs.

* transformers: forward with labels and use_cache=False, backward, ``torch.optim.AdamW`` step (a
  plain loop: no clipping).
* gemmaforge (and ``gemmaforge-lora`` with ``--lora``: LoRA rank 16 on all seven projections): the
  production ``Trainer``'s CPU step, run through the same functions: ``cpu_policy.for_training``
  on the model (``CPUHead`` with its kept [V, H] gradient and logits buffers, ``LeanTiedEmbedding``,
  ``ReturnFreedMemory``), ``train.step.forward_backward`` with ``CausalLMLoss`` (packed forward
  to hidden states, chunked linear+cross-entropy: never the [T, vocab] logits, backward), the
  fused AdamW of ``train.optim.build_optimizer`` and the LR schedule; with ``--clip`` also the
  Trainer's health check and clipping (``grad_norm_and_finite`` + ``clip_grads_``, max norm 1.0),
  which the transformers loop and the landed bench did not time (off by default, so the ratios
  compare the same work as the landed commit's). A ``parts`` line gives the median seconds of
  forward+backward, norm+clip and optimizer within its step.

Peak RSS (``ru_maxrss``) of each worker includes loading its model. ``--loss-chunk`` overrides
``TrainConfig.loss_chunk_size``.
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


def build_step(which: str, seq: int, threads: int, chunk: int = 0, clip: bool = False):
    """Load one side and return ``(step, cfg)``; ``step()`` runs one optimizer step and returns the loss
    (the gemmaforge sides also the seconds of each part of the step, in ``step.parts``)."""
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
        step = _trainer_step(which == "gemmaforge-lora", ids[0], seq, chunk, clip)

    return step, load_config(d)


def _trainer_step(lora: bool, ids, seq: int, chunk: int, clip: bool = False):
    """The production Trainer's single-process CPU step (``Trainer._build_model``, ``__init__`` and
    ``train_step`` / ``_finish_step``), from its own parts: the model loaded as the Trainer loads it,
    LoRA applied as ``Trainer._lora`` does, ``model.train()``, ``cpu_policy.for_training`` (CPUHead
    with kept [V, H] gradient / logits buffers, LeanTiedEmbedding, ReturnFreedMemory hooks and
    trims), ``build_optimizer`` (fused AdamW) and the LR schedule; per step ``forward_backward``
    with ``CausalLMLoss``, ``grad_norm_and_finite`` + ``clip_grads_``, ``optimizer.step``,
    ``zero_grad(set_to_none=True)``, ``scheduler.step``. The batch is one packed row of ``seq``
    tokens (one document: ``seq - 1`` labels), collated as the Trainer collates its rows."""
    import math
    import time

    import torch

    from gemmaforge import cpu_policy
    from gemmaforge.adapters.lora import LoraConfig, apply_lora
    from gemmaforge.data import Document, collate_rows, pack_documents
    from gemmaforge.formats.convert import load_any
    from gemmaforge.formats.resolve import resolve
    from gemmaforge.train import CausalLMLoss, StepLayout, TrainConfig, forward_backward
    from gemmaforge.train.health import clip_grads_, grad_norm_and_finite
    from gemmaforge.train.optim import build_optimizer, lr_lambda

    cfg = TrainConfig(lr=1e-5, seq_len=seq, batch_tokens=seq, micro_batch_rows=1, lora_rank=16 if lora else 0,
                      **({"loss_chunk_size": chunk} if chunk else {}))  # the Trainer's default chunk unless --loss-chunk
    cfg.validate()
    model, _ = load_any(resolve(cfg.model), dtype=torch.float32, device="cpu", with_tokenizer=False)
    if cfg.lora_rank:  # all seven projections of every layer, rank 16
        apply_lora(model, LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                     targets=cfg.lora_targets or None))
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
    assert batches[0]["input_ids"].shape == (1, seq)

    def step():
        t0 = time.perf_counter()
        res = forward_backward(model, batches, objective, layout, autocast=None)
        t1 = time.perf_counter()
        gn, finite = grad_norm_and_finite(params, layout.owner_factor()) if clip and math.isfinite(res.loss) \
            else (None, math.isfinite(res.loss))
        ok = finite and math.isfinite(res.loss)
        if ok and cfg.clip > 0 and gn is not None:
            clip_grads_(params, cfg.clip, gn)
            float(gn)  # the Trainer logs it
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
    return step


def serve(which: str, seq: int, threads: int, chunk: int = 0, clip: bool = False) -> None:
    """Worker process: load, then run one step per ``step`` line on stdin (so that the parent can
    alternate the sides step by step), and report the peak RSS on ``done``."""
    step, cfg = build_step(which, seq, threads, chunk, clip)
    print(json.dumps({"ready": which}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            loss = step()
            t = time.perf_counter() - t0
            print(json.dumps({"t": t, "loss": loss, "parts": getattr(step, "parts", {})}), flush=True)
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
    ap.add_argument("--clip", action="store_true", help="gemmaforge sides: also the Trainer's health check and clipping")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--only", default=None, help="run one side only: gemmaforge or transformers")
    ap.add_argument("--lora", action="store_true", help="also LoRA rank 16 (all seven projections) vs full fine-tune")
    a = ap.parse_args()
    if a.worker:
        serve(a.worker, a.seq, a.threads, a.loss_chunk, a.clip)
        return
    sides = [a.only] if a.only else ["gemmaforge", "transformers"] + (["gemmaforge-lora"] if a.lora else [])
    procs = {}
    for which in sides:  # loaded one after the other; each waits idle while another one steps
        cmd = [sys.executable, __file__, "--worker", which, "--seq", str(a.seq), "--threads", str(a.threads),
               "--loss-chunk", str(a.loss_chunk)] + (["--clip"] if a.clip else [])
        procs[which] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

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
    res = {w: {"times": [], "losses": [], "parts": []} for w in sides}
    for k in range(2 + a.steps):  # steps alternate between the sides: a slow spell hits both
        for which in sides:
            r = ask(which, "step")
            res[which]["losses"].append(r["loss"])
            if k >= 2:
                res[which]["times"].append(r["t"])
                if r.get("parts"):
                    res[which]["parts"].append(r["parts"])
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
    for k, r in res.items():  # where the Trainer's step spends its time (medians over the timed steps)
        if r["parts"]:
            print(f"{k:15s} parts: " + "  ".join(f"{name} {statistics.median(p[name] for p in r['parts']):.3f}s"
                                                  for name in r["parts"][0]))
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
