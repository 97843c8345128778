"""Greedy decode speed of the embedded Gemma 3 270M: gemmaforge vs transformers, same run, same weights.

    .venv/bin/python bench/bench_generate.py [--new-tokens 128] [--threads 2] [--repeats 3]

Also reports the achieved weight bandwidth (bytes of parameters streamed per token / time per token)
against a plain large-tensor copy measured in the same process, and the load times (first load
converts the GGUF once; later loads memory-map the cache).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch


def copy_bandwidth(gb: float = 1.0, repeats: int = 5) -> float:
    """GB/s of bytes *read* by a plain copy of a large fp32 tensor (a copy reads n and writes n)."""
    n = int(gb * 1e9 / 4)
    src = torch.ones(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return n * 4 / min(ts) / 1e9


def weight_bytes(model) -> int:
    # every parameter is streamed once per token; the tied embedding/head is counted once (it is read
    # in full by the head matmul; the embedding lookup reads one row)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="The Python programming language is")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import gemmaforge
    from gemmaforge.formats.resolve import embedded_dir
    from gemmaforge.inference.generate import generate_ids

    hf_dir = embedded_dir()  # converts once on first use
    # load time in a fresh process (what a user sees on a second run)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gemmaforge; gemmaforge.from_pretrained('gemma-3-270m')"], check=True)
    load_fresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = gemmaforge.from_pretrained("gemma-3-270m")
    load_warm = time.perf_counter() - t0
    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    ids = tok.encode(a.prompt)

    import transformers

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t0

    def ours():
        st = generate_ids(model, ids, max_new_tokens=a.new_tokens, stop_ids=set())
        return st.ids, st.new_tokens / (st.prefill_s + st.decode_s), st.decode_s / max(st.new_tokens - 1, 1)

    def theirs():
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t0
        return out[0, len(ids):].tolist(), a.new_tokens / dt, None

    ours()  # warm-up
    theirs()
    o_runs = [ours() for _ in range(a.repeats)]
    t_runs = [theirs() for _ in range(a.repeats)]
    same = o_runs[0][0] == t_runs[0][0]
    o_tps = statistics.median(r[1] for r in o_runs)
    t_tps = statistics.median(r[1] for r in t_runs)
    per_tok = statistics.median(r[2] for r in o_runs)
    wb = weight_bytes(model)
    bw = wb / per_tok / 1e9
    cp = copy_bandwidth()
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"greedy decode {a.new_tokens} tokens (prompt {len(ids)} tokens), median of {a.repeats}, end-to-end incl. prefill:")
    print(f"  gemmaforge   {o_tps:6.2f} tokens/s")
    print(f"  transformers {t_tps:6.2f} tokens/s")
    print(f"  ratio        {o_tps / t_tps:6.2f}x   (identical tokens: {same})")
    print(f"weight bandwidth: {wb / 1e9:.3f} GB of weights per token / {per_tok * 1e3:.1f} ms per decode step "
          f"= {bw:.1f} GB/s; plain large-tensor copy reads {cp:.1f} GB/s ({bw / cp:.0%} of copy)")
    print(f"load: gemmaforge {load_fresh:.2f}s in a fresh process (cached), {load_warm:.2f}s in-process; "
          f"transformers from the same HF dir {hf_load:.2f}s")


if __name__ == "__main__":
    main()
