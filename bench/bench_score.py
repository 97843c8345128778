"""Scoring one packed row with the real Gemma 3 270M: chunked ``gemmaforge.score`` vs full logits.

    .venv/bin/python bench/bench_score.py [--tokens 4096] [--chunk-size 512] [--repeats 2] [--write]

Each path runs in a fresh subprocess (``torch.set_num_threads(2)``, ``torch.no_grad``, fp32 CPU):

* ``naive``: ``model(ids, cu_seqlens=cu)`` -> ``[T, V]`` logits (soft-capped if the config says so),
  ``log_softmax``, ``gather`` at the next tokens -- what one writes without gemmaforge.rl.score.
* ``chunked``: ``gemmaforge.rl.score.score(model, ids, cu)`` (the LM head's chunked ``logprobs``, in
  ``--chunk-size`` chunks).
* ``chunked+entropy``: the same with ``return_entropy=True`` (what ``gemmaforge score`` computes).

Memory: ``ru_maxrss`` of the whole worker (model load included) and the peak of the scoring
phase alone (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once the model is
loaded); time: best of ``--repeats`` scoring calls, split into the decoder body (to the final
norm) and the LM head. ``--write`` writes ``bench/results/score.md``.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ["naive", "chunked", "chunked+entropy"]


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(mode: str, tokens: int, chunk: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    import gemmaforge
    from gemmaforge.rl.score import score

    t0 = time.perf_counter()
    model = gemmaforge.from_pretrained("gemma-3-270m")
    load_s = time.perf_counter() - t0
    V = model.config.vocab_size
    # one packed row: documents of assorted lengths (the content does not change time or memory)
    g = torch.Generator().manual_seed(0)
    lengths, left = [], tokens
    for n in [1024, 512, 1536, 256, 768]:
        if left <= 0:
            break
        lengths.append(min(n, left))
        left -= lengths[-1]
    if left > 0:
        lengths.append(left)
    ids = torch.randint(0, V, (tokens,), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    tgt = torch.zeros_like(ids)
    tgt[:-1] = ids[1:]

    import gc

    with torch.no_grad():  # fault every weight page in, so "after load" holds the whole model
        for p in model.parameters():
            p.sum()
    gc.collect()
    rss_loaded = _status_kib("VmRSS")
    reset_ok = _reset_peak()
    times, body_times, head_times = [], [], []
    result = None
    with torch.no_grad():
        for _ in range(repeats):
            result = None
            gc.collect()
            t = time.perf_counter()
            if mode == "naive":
                hidden = model(ids, cu_seqlens=cu, return_hidden=True)
                tb = time.perf_counter()
                logits = model.logits(hidden)  # = model(ids, cu_seqlens=cu): [T, V] soft-capped
                logp = torch.log_softmax(logits.float(), dim=-1)
                del logits
                result = logp.gather(1, tgt[:, None]).squeeze(1)
                del logp
            else:
                # score() runs the same body forward then the chunked head; time the two apart
                hidden = model(ids, cu_seqlens=cu, return_hidden=True)
                tb = time.perf_counter()
                out = model.lm_head.logprobs(hidden, tgt, chunk_size=chunk,
                                             return_entropy=mode == "chunked+entropy")
                result = out[0] if isinstance(out, tuple) else out
            te = time.perf_counter()
            times.append(te - t)
            body_times.append(tb - t)
            head_times.append(te - tb)
            del hidden
        # the public entry point once more, to check it agrees with the split timing path
        if mode != "naive":
            t = time.perf_counter()
            s = score(model, ids, cu, chunk_size=chunk, return_entropy=mode == "chunked+entropy")
            score_s = time.perf_counter() - t
            valid = s.valid
            agree = float((s.logprobs[valid] - result[valid]).abs().max())
        else:
            score_s, agree = None, None
    peak_scoring = _status_kib("VmHWM")
    return {
        "mode": mode, "tokens": tokens, "chunk_size": chunk, "load_s": load_s,
        "rss_loaded_mib": rss_loaded / 1024, "peak_scoring_mib": peak_scoring / 1024 if reset_ok else None,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "time_s": min(times), "times_s": times, "body_s": min(body_times), "head_s": min(head_times),
        "score_call_s": score_s, "score_vs_split_max_abs": agree,
        "softcap": model.config.final_logit_softcapping, "vocab": V,
        "head_weight_mib": model.lm_head.matrix().numel() * 4 / 2**20,
        "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "checksum": float(result[:-1].double().sum()),
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--write", action="store_true", help="write bench/results/score.md")
    ap.add_argument("--from-log", default=None, help="write score.md from the saved stdout of an earlier run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.from_log:
        res = json.loads([x for x in Path(a.from_log).read_text().splitlines() if x.startswith("{")][-1])
        a.tokens = next(iter(res.values()))["tokens"]
        a.chunk_size = next(iter(res.values()))["chunk_size"]
        a.repeats = len(next(iter(res.values()))["times_s"])
        _write(res, a)
        return 0
    if a.chunk_size is None:
        from gemmaforge.rl.score import DEFAULT_CHUNK

        a.chunk_size = DEFAULT_CHUNK
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.tokens, a.chunk_size, a.repeats)))
        return 0

    res = {}
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--tokens", str(a.tokens), "--chunk-size",
               str(a.chunk_size), "--repeats", str(a.repeats)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(p.stdout, p.stderr, file=sys.stderr)
            raise SystemExit(f"worker {mode} failed (exit {p.returncode})")
        res[mode] = json.loads(line[0][len("RESULT "):])
        r = res[mode]
        print(f"{mode:16s} time {r['time_s']:.2f}s (body {r['body_s']:.2f}s, head {r['head_s']:.2f}s)  "
              f"scoring peak {r['peak_scoring_mib']:.0f} MiB  ru_maxrss {r['ru_maxrss_mib']:.0f} MiB  "
              f"rss after load {r['rss_loaded_mib']:.0f} MiB", flush=True)
    if "naive" in res and "chunked" in res:
        n, c = res["naive"], res["chunked"]
        print(f"chunked / naive: scoring peak {c['peak_scoring_mib'] / n['peak_scoring_mib']:.3f}x, "
              f"ru_maxrss {c['ru_maxrss_mib'] / n['ru_maxrss_mib']:.3f}x, time {c['time_s'] / n['time_s']:.3f}x, "
              f"checksums {n['checksum']:.2f} vs {c['checksum']:.2f}")
    print(json.dumps(res))
    if a.write:
        _write(res, a)
    return 0


def _write(res: dict, a) -> None:
    n = res.get("naive")
    lines = [
        "# Scoring a packed row: chunked `gemmaforge.score` vs full logits",
        "",
        f"- machine: {_cpu_name()}, {os.cpu_count()} cores visible, torch {__import__('torch').__version__}, "
        f"Python {platform.python_version()}, Linux {platform.release()}",
        f"- command: `.venv/bin/python bench/bench_score.py --tokens {a.tokens} --chunk-size {a.chunk_size} "
        f"--repeats {a.repeats} --write` (or `> log` then `--from-log log`)",
        f"- model: gemma-3-270m (embedded GGUF, dequantised to fp32), vocab {next(iter(res.values()))['vocab']}, "
        "CPU, `torch.set_num_threads(2)`, `torch.no_grad()`",
        f"- row: {a.tokens} tokens in 5 documents (1024+512+1536+256+768); each mode in a fresh subprocess",
        "- peak = `VmHWM` of the scoring phase (reset after loading); `ru_maxrss` = whole process incl. load",
        "",
        "| mode | time (best of %d) | body | LM head | scoring peak RSS | RSS after load | ru_maxrss |" % a.repeats,
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in res.items():
        lines.append(f"| {mode} | {r['time_s']:.2f} s | {r['body_s']:.2f} s | {r['head_s']:.2f} s | "
                     f"{r['peak_scoring_mib']:.0f} MiB | {r['rss_loaded_mib']:.0f} MiB | "
                     f"{r['ru_maxrss_mib']:.0f} MiB |")
    if n:
        lines += ["", "Ratios to naive:", ""]
        for mode, r in res.items():
            if mode == "naive":
                continue
            extra = (r['peak_scoring_mib'] - r['rss_loaded_mib']) / (n['peak_scoring_mib'] - n['rss_loaded_mib'])
            lines.append(f"- {mode}: scoring peak **{r['peak_scoring_mib'] / n['peak_scoring_mib']:.3f}x** "
                         f"(goal <= 0.3x), extra over the loaded model "
                         f"{extra:.3f}x, "
                         f"ru_maxrss {r['ru_maxrss_mib'] / n['ru_maxrss_mib']:.3f}x, "
                         f"time **{r['time_s'] / n['time_s']:.3f}x** (goal <= 1.1x), "
                         f"LM head alone {r['head_s'] / n['head_s']:.3f}x")
    out = HERE / "results" / "score.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + _NOTES)
    print(f"wrote {out}")


_NOTES = ""  # the analysis section of results/score.md is written by hand after a run


if __name__ == "__main__":
    sys.exit(main())
