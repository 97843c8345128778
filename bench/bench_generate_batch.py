"""Batched greedy generation on the embedded Gemma 3 270M: gemmaforge vs transformers, same run, same weights.

    .venv/bin/python bench/bench_generate_batch.py [--prompts 16] [--new-tokens 128] [--threads 2] [--repeats 3]

16 ragged prompts (real text from CPython's ``pydoc_data.topics``, cut to lengths spread evenly from
``--min-len`` to ``--max-len`` tokens) x 128 new tokens, greedy, fp32, no stop id (every row makes all
its tokens on both sides). gemmaforge: ``generate_batch_ids`` (packed prefill, per-row KV cache).
transformers: ``generate`` on the same batch left-padded (its documented way of batching), with
``attention_mask``. The two sides alternate run by run (the machine may be shared); medians reported.
Identical tokens are asserted (a row that differs is reported with the top-2 logit gap at the first
difference).

The floor: this machine's peak fp32 GEMM rate and streaming-read bandwidth, measured here; a forward
costs at least ``max(weight bytes / bandwidth, its FLOPs / peak)`` (weights streamed once per forward,
GEMMs at peak). The fraction reported is floor time / measured time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one untimed call), in seconds."""
    from gemmaforge.ops.cpu_caps import best_times

    fn()
    return best_times([fn], repeats)[0]


def peak_gflops(repeats: int = 5) -> float:
    """Best fp32 GEMM rate over a few large shapes (including the decode-like 16-row head product),
    through ATen's ``mm`` (MKL) and through oneDNN's packed product (``ops.packed_linear``, what
    gemmaforge decodes with where it pays): the faster library sets the floor."""
    from gemmaforge.ops import packed_linear

    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (4096, 640, 2048), (2048, 2048, 640), (512, 640, 16384), (16, 640, 65536)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        products = [lambda: a @ b]
        if packed_linear._ops_present():
            packed = packed_linear._pack(b.t())
            products.append(lambda: packed_linear._product(a, packed, None))
        for fn in products:
            best = max(best, 2 * m * k * n / best_time(fn, repeats) / 1e9)
    return best


def read_bandwidth(gb: float = 1.0, repeats: int = 5) -> float:
    """GB/s streaming-read: the better of a large tensor's sum (reads n) and copy (bytes read)."""
    n = int(gb * 1e9 / 4)
    src = torch.ones(n)
    dst = torch.empty_like(src)
    best = 0.0
    for fn in (lambda: src.sum(), lambda: dst.copy_(src)):
        best = max(best, n * 4 / best_time(fn, repeats) / 1e9)
    return best


def model_shape(model):
    cfg = model.config
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    head_params = cfg.vocab_size * cfg.hidden_size
    # params of the GEMMs every token goes through (not the embedding lookup, not the head)
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
               and "lm_head" not in n)
    return total, body, head_params


def attention_flops(cfg, q_len: int, k_len: int, causal_prefill: bool) -> float:
    """QK^T and PV of one sequence summed over layers (a sliding layer sees at most its window)."""
    hq, d = cfg.num_attention_heads, cfg.head_dim
    total = 0.0
    for t in cfg.layer_types:
        w = cfg.window_for(t)
        if causal_prefill:
            pairs = sum(min(i + 1, w or i + 1) for i in range(q_len))
        else:
            pairs = q_len * min(k_len, w or k_len)
        total += 2 * 2 * hq * d * pairs
    return total


def floor_seconds(model, lengths, new_tokens, gflops, gbps) -> tuple[float, float, float]:
    """(prefill floor, decode floor, total) seconds."""
    cfg = model.config
    wbytes, body, head = model_shape(model)
    stream = wbytes / (gbps * 1e9)
    T, B = sum(lengths), len(lengths)
    f = 2 * T * body + 2 * B * head + sum(attention_flops(cfg, n, n, True) for n in lengths)
    pre = max(stream, f / (gflops * 1e9))
    dec = 0.0
    for s in range(new_tokens - 1):  # the last token needs no forward
        f = 2 * B * (body + head) + sum(attention_flops(cfg, 1, n + s + 1, False) for n in lengths)
        dec += max(stream, f / (gflops * 1e9))
    return pre, dec, pre + dec


def prompt_ids(tok, n: int, lo: int, hi: int) -> list[list[int]]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok.encode(text)
    lengths = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    out, pos = [], 1
    for L in lengths:  # BOS then a different stretch of text per prompt
        out.append([ids[0]] + ids[pos:pos + L - 1])
        pos += 997
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import transformers

    import gemmaforge
    from gemmaforge.formats.resolve import embedded_dir
    from gemmaforge.inference.batch import generate_batch_ids

    hf_dir = embedded_dir()
    model = gemmaforge.from_pretrained("gemma-3-270m", dtype=torch.float32)
    tok = gemmaforge.load_tokenizer("gemma-3-270m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = prompt_ids(tok, a.prompts, a.min_len, a.max_len)
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    pad = 0
    x = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])

    def ours(new=a.new_tokens):
        t0, c0 = time.perf_counter(), time.process_time()
        st = generate_batch_ids(model, prompts, max_new_tokens=new, stop_ids=set(), return_stats=True)
        return st.ids, time.perf_counter() - t0, st.prefill_s, time.process_time() - c0

    def theirs(new=a.new_tokens):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, eos_token_id=None, pad_token_id=pad)
        return out[:, P:].tolist(), time.perf_counter() - t0, None, time.process_time() - c0

    print(f"warm-up ({a.prompts} prompts of {min(lengths)}..{P} tokens, {sum(lengths)} in all; 8 new tokens "
          f"each; the runs then make {a.new_tokens})", flush=True)
    ours(8)
    theirs(8)
    o_runs, t_runs = [], []
    for r in range(a.repeats):  # alternate: a shared machine's load hits both sides alike
        o_runs.append(ours())
        t_runs.append(theirs())
        print(f"  round {r + 1}: gemmaforge {o_runs[-1][1]:.2f}s (prefill {o_runs[-1][2]:.2f}s; process CPU "
              f"{o_runs[-1][3]:.1f}s), transformers {t_runs[-1][1]:.2f}s (process CPU {t_runs[-1][3]:.1f}s)",
              flush=True)
    new = a.prompts * a.new_tokens
    o_ids, t_ids = o_runs[0][0], t_runs[0][0]
    o_s = statistics.median(r[1] for r in o_runs)
    t_s = statistics.median(r[1] for r in t_runs)
    o_pre = statistics.median(r[2] for r in o_runs)

    diff = [i for i, (u, v) in enumerate(zip(o_ids, t_ids)) if u != v]
    for i in diff:  # how close to a tie the first differing token was
        s = next(j for j, (u, v) in enumerate(zip(o_ids[i], t_ids[i])) if u != v)
        with torch.inference_mode():
            z = model(torch.tensor([prompts[i] + o_ids[i][:s]]))[0, -1].float()
        top = torch.topk(z, 2).values
        print(f"  row {i} differs from token {s}: ours {o_ids[i][s]}, transformers {t_ids[i][s]}, "
              f"top-2 logit gap there {float(top[0] - top[1]):.2e}")

    gflops, gbps = peak_gflops(), read_bandwidth()
    pre_f, dec_f, tot_f = floor_seconds(model, lengths, a.new_tokens, gflops, gbps)
    wbytes = model_shape(model)[0]
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}")
    print(f"batched greedy, {a.prompts} prompts ({min(lengths)}..{P} tokens) x {a.new_tokens} new tokens, "
          f"median of {a.repeats}, end-to-end incl. prefill:")
    print(f"  gemmaforge   {new / o_s:7.2f} tokens/s  ({o_s:.2f}s; prefill {o_pre:.2f}s)")
    print(f"  transformers {new / t_s:7.2f} tokens/s  ({t_s:.2f}s)")
    print(f"  ratio        {t_s / o_s:7.2f}x   (identical tokens: {not diff}; rows differing: {diff})")
    o_c = statistics.median(r[3] for r in o_runs)
    t_c = statistics.median(r[3] for r in t_runs)
    print(f"  process CPU time: gemmaforge {o_c:.1f}s, transformers {t_c:.1f}s ({t_c / o_c:.2f}x; a second view where the "
          f"machine's load swings between rounds; threads spin-waiting for a descheduled peer count too)")
    print(f"floor: peak GEMM {gflops:.0f} GFLOP/s, streaming read {gbps:.1f} GB/s, weights {wbytes / 1e9:.3f} GB "
          f"per forward -> prefill {pre_f:.2f}s + decode {dec_f:.2f}s = {tot_f:.2f}s "
          f"({new / tot_f:.1f} tokens/s)")
    print(f"  gemmaforge at {tot_f / o_s:.0%} of the floor (prefill {pre_f / o_pre:.0%}, decode "
          f"{dec_f / (o_s - o_pre):.0%}); transformers at {tot_f / t_s:.0%}")
    assert not diff, f"rows {diff} differ"


if __name__ == "__main__":
    main()
