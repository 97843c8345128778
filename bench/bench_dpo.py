"""DPO step on the embedded Gemma 3 270M: gemmaforge's Trainer vs TRL's ``DPOTrainer``, same model, same pairs.

    .venv/bin/python bench/bench_dpo.py [--steps 3] [--threads 2] [--tokens 256]

Needs ``trl`` (not a gemmaforge dependency: ``.venv/bin/pip install trl``; measured with trl 1.16.0).
4 preference pairs of CPython's language reference (prompt: a paragraph's opening; chosen: its real
continuation; rejected: the same words shuffled), each prompt + completion up to ``--tokens`` tokens; full
fine-tune, fp32, sigmoid loss, beta 0.1, AdamW, a frozen reference model on both sides.

Each side runs in its own process (so its peak resident memory is its own) and the parent alternates them
step by step (one steps while the other waits idle): one warm-up step each, then the median of ``--steps``
timed steps per side and the median ratio of back-to-back pairs.

* gemmaforge: ``Trainer.train_step`` with ``DPOTask`` (the pairs packed: chosen and rejected of a pair as two
  documents of one row of 2 x ``--tokens``, 4 rows in one micro-batch; reference log-probs precomputed once
  before step 1 by the base weights, no frozen copy kept, gemmaforge's default, the time printed; ``--reference live``: from
  the frozen copy without gradient in every step; the fused DPO objective through the chunked LM head; health check, clipping, AdamW).
* TRL: ``DPOTrainer.training_step`` (its collator's padded [chosen; rejected] batch, reference forward
  inside the loss, backward) + its optimizer's step (``per_device_train_batch_size=4``, ``max_length``
  ``--tokens``, no gradient checkpointing, ``use_cpu``).

Peak RSS (``ru_maxrss``) of each worker includes loading its model(s).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pairs_text(tokenizer, n: int, tokens: int) -> list[dict]:
    import random

    from pydoc_data.topics import topics

    rng = random.Random(0)
    out = []
    for key in sorted(topics):
        words = " ".join(topics[key].split()).split(" ")
        if len(words) < 400:
            continue
        prompt, cont = " ".join(words[:60]), words[60:]
        while True:
            shuffled = cont[:]
            rng.shuffle(shuffled)
            if max(len(tokenizer.encode(prompt + " " + " ".join(c))) for c in (cont, shuffled)) <= tokens:
                break
            cont = cont[:-4]
        out.append({"prompt": prompt, "chosen": " " + " ".join(cont), "rejected": " " + " ".join(shuffled)})
        if len(out) == n:
            return out
    raise RuntimeError("not enough long topics")


def build(which: str, threads: int, tokens: int, workdir: Path, reference: str = "precompute"):
    import torch

    torch.set_num_threads(threads)
    import gemmaforge

    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    data = pairs_text(tok, 4, tokens)
    if which == "gemmaforge":
        from gemmaforge.rl.dpo import PreferencePair
        from gemmaforge.train import TrainConfig, Trainer
        from gemmaforge.train.tasks import DPOTask

        pairs = [PreferencePair(list(tok.encode(d["prompt"])), list(tok.encode(d["chosen"], add_bos=False)) + [tok.eos_id],
                                list(tok.encode(d["rejected"], add_bos=False)) + [tok.eos_id], f"pair{i}")
                 for i, d in enumerate(data)]
        cfg = TrainConfig(out=str(workdir / "gf"), steps=100, lr=1e-6, warmup_steps=0, seq_len=2 * tokens,
                          batch_tokens=8 * tokens, micro_batch_rows=4, eval_every=0, save_every=0,
                          progress=False, dtype="float32", schedule="constant")
        t0 = time.perf_counter()
        tr = Trainer(cfg, model=gemmaforge.from_pretrained("gemma-3-270m"), tokenizer=tok, train_docs=pairs,
                     val_docs=[], task=DPOTask(beta=0.1, reference=reference),
                     log=lambda m: m.startswith("reference:") and print(m, file=sys.stderr, flush=True))
        print(f"gemmaforge: model, reference ({reference}) and trainer ready in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        assert len(tr.train_rows) == 4, len(tr.train_rows)

        def step():
            return tr.train_step()["loss"]

        return step
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from gemmaforge.formats.hf import save_hf

    d = workdir / "hf"
    if not (d / "config.json").exists():
        save_hf(gemmaforge.from_pretrained("gemma-3-270m"), d, tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    hft = AutoTokenizer.from_pretrained(d)
    args = DPOConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=4, max_length=tokens,
                     beta=0.1, learning_rate=1e-6, use_cpu=True, report_to=[], logging_steps=1000, save_strategy="no",
                     bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, max_steps=100)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=hft)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train's loop sets before training_step
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))

    def step():
        loss = trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
        return float(loss)

    return step


def worker(which: str, threads: int, tokens: int, workdir: str, reference: str) -> None:
    step = build(which, threads, tokens, Path(workdir), reference)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({"s": dt, "loss": loss, "rss_gib": rss}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--workdir", default="/tmp/gf-bench-dpo")
    ap.add_argument("--reference", default="precompute", choices=["precompute", "live"],
                    help="gemmaforge's DPO reference: precomputed once before step 1 (no frozen copy kept; "
                         "the default) or a live frozen copy scoring each batch")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.threads, a.tokens, a.workdir, a.reference)
    import torch

    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    sides = ["gemmaforge", "trl"]
    procs = {}
    for s in sides:  # one at a time: the TRL side reads the HF dir the first writes
        p = subprocess.Popen([sys.executable, __file__, "--worker", s, "--threads", str(a.threads), "--tokens",
                              str(a.tokens), "--workdir", a.workdir, "--reference", a.reference], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
        assert p.stdout.readline().strip() == "ready", s
        procs[s] = p
    res = {s: [] for s in sides}
    for i in range(a.steps + 1):
        for s in sides:
            procs[s].stdin.write("step\n")
            procs[s].stdin.flush()
            r = json.loads(procs[s].stdout.readline())
            if i:
                res[s].append(r)
            print(s, i, r, flush=True)
    for p in procs.values():
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait()
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    med = {s: statistics.median(r["s"] for r in res[s]) for s in sides}
    rss = {s: max(r["rss_gib"] for r in res[s]) for s in sides}
    ratios = [b["s"] / a_["s"] for a_, b in zip(res["gemmaforge"], res["trl"])]
    print(json.dumps({"reference": a.reference, "cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": a.threads,
                      "step_s": med, "speedup_median_of_pairs": statistics.median(ratios),
                      "peak_rss_gib": rss, "memory_ratio": rss["gemmaforge"] / rss["trl"],
                      "loss_first": {s: res[s][0]["loss"] for s in sides}}, indent=1))


if __name__ == "__main__":
    main()
