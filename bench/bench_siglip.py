"""Gemma 3's SigLIP vision tower at its real shape (896 px, 27 layers, width 1152, 16 heads, MLP 4304;
random weights): one image, forward + backward (parameter gradients too), fp32, gemmaforge against
transformers 5.23's ``SiglipVisionModel`` (its default SDPA attention) in the same run.

Each measurement is its own process (so peak RSS is that side's alone: ``ru_maxrss``); the sides
alternate ``--rounds`` times and the medians are reported. A process builds its tower, runs
``--warmup`` untimed steps, then ``--steps`` timed ones.

    .venv/bin/python bench/bench_siglip.py [--threads 2] [--rounds 2] [--layers 27] [--warmup 0] [--steps 1]
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


def one(side: str, layers: int, threads: int, warmup: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers, num_attention_heads=16,
               image_size=896, patch_size=14, layer_norm_eps=1e-6)
    if side == "gemmaforge":
        from gemmaforge.models.gemma3.config import SiglipVisionConfig
        from gemmaforge.models.gemma3.vision import SiglipVisionModel

        model = SiglipVisionModel(SiglipVisionConfig(**cfg))
        fwd = model
    else:
        import transformers

        hf_cfg = transformers.SiglipVisionConfig(**cfg, vision_use_head=False)
        model = transformers.SiglipVisionModel(hf_cfg)
        fwd = lambda px: model(pixel_values=px).last_hidden_state  # noqa: E731
    model.train()
    px = torch.randn(1, 3, 896, 896)
    times = []
    for i in range(warmup + steps):
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        out = fwd(px)
        out.float().square().mean().backward()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        del out
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"side": side, "step_s": statistics.median(times), "peak_rss_gib": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--only", default=None, choices=["gemmaforge", "transformers"], help="measure one side only")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(one(a.side, a.layers, a.threads, a.warmup, a.steps)))
        return
    import platform

    import torch

    model_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
                      platform.processor())
    print(f"machine: {model_name}; torch {torch.__version__}; capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    res: dict[str, list[dict]] = {"gemmaforge": [], "transformers": []}
    for r in range(a.rounds):
        order = ("gemmaforge", "transformers") if r % 2 == 0 else ("transformers", "gemmaforge")
        order = tuple(x for x in order if a.only in (None, x))
        for side in order:
            cmd = [sys.executable, __file__, "--side", side, "--layers", str(a.layers), "--threads", str(a.threads),
                   "--warmup", str(a.warmup), "--steps", str(a.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. killed by the kernel when the shared machine runs out of memory
                print(f"round {r + 1} {side:12s} FAILED (exit {proc.returncode}): {proc.stderr.strip()[-300:]}",
                      flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            res[side].append(row)
            print(f"round {r + 1} {side:12s} step {row['step_s']:.1f} s  peak RSS {row['peak_rss_gib']:.2f} GiB  "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    if not all(res.values()):
        print("a side has no measurement: no ratio")
        return
    med = {s: (statistics.median(x["step_s"] for x in v), statistics.median(x["peak_rss_gib"] for x in v))
           for s, v in res.items()}
    (gt, gm), (ht, hm) = med["gemmaforge"], med["transformers"]
    print(f"median step: gemmaforge {gt:.1f} s, transformers {ht:.1f} s -> speed {ht / gt:.2f}x (goal >= 1.2x)")
    print(f"median peak RSS: gemmaforge {gm:.2f} GiB, transformers {hm:.2f} GiB -> {gm / hm:.2f}x (goal <= 0.8x)")


if __name__ == "__main__":
    main()
