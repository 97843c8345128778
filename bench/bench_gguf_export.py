"""Exporting the real Gemma 3 270M to GGUF: time per dtype (target: f16 under 30 s on this machine).

    .venv/bin/python bench/bench_gguf_export.py [--dtype f16 [--dtype q8_0 ...]] [--repeats 1] [--keep DIR]

Each run is a fresh subprocess doing what ``gemmaforge export-gguf --out F.gguf --dtype D`` does:
start Python, load the model (the embedded default, an HF dir in the cache after the first use) and
its tokenizer, write the file. Reported: the whole command's wall time (``total``, what a user
waits), and its parts: imports + model + tokenizer load (``load``) and the export itself
(``export``: vocabulary, metadata, tensors converted and streamed to disk), the file size, and the
peak RSS. The machine line gives the CPU model (``lscpu``), ``torch.backends.cpu.get_cpu_capability()``
and the threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = {"f16": 30.0}


def machine() -> str:
    import torch

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return (f"CPU {cpu} ({os.cpu_count()} cores visible), torch.backends.cpu.get_cpu_capability() = "
            f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def worker(dtype: str, out: str) -> dict:
    t0 = time.perf_counter()
    import gemmaforge
    from gemmaforge.formats.gguf.writer import export_gguf, source_chat_template
    from gemmaforge.formats.resolve import resolve

    src = resolve("gemma-3-270m")
    model = gemmaforge.from_pretrained(src)
    tok = gemmaforge.load_tokenizer(src)
    t1 = time.perf_counter()
    path = export_gguf(model, tok, out, dtype=dtype, name="gemma-3-270m", chat_template=source_chat_template(src))
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "export_s": t2 - t1, "size_mib": Path(path).stat().st_size / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", action="append", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--keep", default=None, help="write the files into this folder and keep them")
    p.add_argument("--worker", nargs=2, metavar=("DTYPE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0

    # first use converts the embedded GGUF into the cache: do it outside the timed runs
    subprocess.run([sys.executable, "-c", "import gemmaforge.formats.resolve as r; r.resolve('gemma-3-270m')"],
                   check=True)
    print(machine())
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.keep) if a.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for dtype in a.dtype or ["f16"]:
            best = None
            for _ in range(a.repeats):
                out = folder / f"gemma-3-270m-{dtype}.gguf"
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, __file__, "--worker", dtype, str(out)], capture_output=True,
                                   text=True)
                total = time.perf_counter() - t0
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return 1
                res = json.loads(r.stdout.strip().splitlines()[-1]) | {"total_s": total}
                if best is None or res["total_s"] < best["total_s"]:
                    best = res
            target = TARGET_S.get(dtype)
            verdict = "" if target is None else (f"  (target < {target:.0f} s: "
                                                 f"{'met' if best['total_s'] < target else 'MISSED'})")
            ok &= target is None or best["total_s"] < target
            print(f"{dtype:5s} total {best['total_s']:6.1f} s = load {best['load_s']:5.1f} s + export "
                  f"{best['export_s']:5.1f} s (+ interpreter start); {best['size_mib']:7.1f} MiB, peak RSS "
                  f"{best['peak_rss_mib']:6.0f} MiB{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
