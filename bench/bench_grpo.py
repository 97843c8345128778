"""A GRPO step on the embedded Gemma 3 270M, split into its parts, and its throughput.

    .venv/bin/python bench/bench_grpo.py [--steps 3] [--threads 2] [--group-size 8] [--prompts 2] [--new 32]

The production ``Trainer`` with ``GRPOTask`` (LoRA rank 16, fp32, reward "the completion holds a digit",
one update per rollout batch, a KL penalty to the adapter-disabled reference): per step the seconds of

* generation: ``--prompts`` x ``--group-size`` completions of up to ``--new`` tokens, sampled at temperature 1
  by the batched generator in one ragged batch;
* reference: the reference log-probs of the packed rollout rows (no gradient);
* policy forward/backward (+ health check, clipping, AdamW): the rest of the step;

and tokens/s: completion tokens generated per second of generation, and rollout tokens (prompt +
completion) trained per second of the whole step. One warm-up step, then the median of ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

PROMPTS = ["The number of legs of a spider is", "The year the war ended was", "The price of the ticket was",
           "The population of the town is", "The temperature outside was", "The score at half time was",
           "The distance to the moon is", "The answer to the riddle is"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    import gemmaforge
    from gemmaforge.rl.grpo import PromptItem
    from gemmaforge.rl.rewards import has_number
    from gemmaforge.train import TrainConfig, Trainer
    from gemmaforge.train.tasks import GRPOTask

    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    items = [PromptItem(f"p{i}", {"prompt": p}, p, list(tok.encode(p))) for i, p in enumerate(PROMPTS)]
    seq = 64 if a.new <= 48 else 2 * a.new
    cfg = TrainConfig(out=tempfile.mkdtemp(prefix="gf-bench-grpo-"), steps=100, lr=1e-4, warmup_steps=0, seq_len=seq,
                      batch_tokens=2 * seq, micro_batch_rows=4, eval_every=0, save_every=0, progress=False,
                      dtype="float32", lora_rank=16, schedule="constant")
    task = GRPOTask(has_number, group_size=a.group_size, max_new_tokens=a.new, prompts_per_step=a.prompts)
    tr = Trainer(cfg, model=gemmaforge.from_pretrained("gemma-3-270m"), tokenizer=tok, train_docs=items, task=task,
                 log=lambda m: None)
    rows = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        r = tr.train_step()
        total = time.perf_counter() - t0
        gen, ref = r["generate_s"], r["reference_s"]
        n_new = r["completion_len"] * a.prompts * a.group_size
        rollout_tokens = sum(int(b["labels"].numel() - (b["input_ids"] == 0).sum()) for b in tr.source._cache)
        row = {"step_s": total, "generate_s": gen, "reference_s": ref, "policy_s": total - gen - ref,
               "completion_tokens": n_new, "gen_tok_s": n_new / gen, "rollout_tok_s": rollout_tokens / total,
               "reward_mean": r["reward_mean"]}
        print(i, json.dumps(row), flush=True)
        if i:
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    print(json.dumps({"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": a.threads,
                      "median": med, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
                     indent=1))


if __name__ == "__main__":
    main()
