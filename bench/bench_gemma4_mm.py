"""A Gemma 4 image+text training step: gemmaforge's packed rows against transformers' padded batch.

The same samples on both sides: ``--docs`` documents, each ``<text> <image> <text>`` with generated
images of several sizes and aspect ratios (the Gemma 4 image processor, ``--soft`` soft tokens at
most per image: 70 by default) and text of log-uniform lengths; a tiny-but-wide Gemma 4 (E2B-like
decoder with per-layer embeddings and a vision tower, random weights, fp32). One step = forward,
loss (cross entropy over the text tokens that follow text; image tokens carry no loss), backward and
AdamW.

- gemmaforge: the documents packed into rows of ``--seq`` tokens (``cu_seqlens``; no padding
  beyond each row's tail), ``model(ids, cu_seqlens=..., pixel_values=..., image_position_ids=...)``;
- transformers: ``Gemma4ForConditionalGeneration`` on the documents right-padded to the longest,
  ``attention_mask``, ``mm_token_type_ids``, the same pixels.

Each side runs in its own process (its peak RSS, ``ru_maxrss``, is its own, loading included); steps
alternate between the sides (a slow spell on a shared machine hits both); the median of ``--steps``
timed steps after two warm-up steps, the median of back-to-back ratios, and the medians of each
step's process CPU time (steadier than wall time on a shared machine; at ``--threads 1`` it is the
work done).

    .venv/bin/python bench/bench_gemma4_mm.py [--docs 8] [--seq 2048] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time


def bench_config():
    from gemmaforge.models.common.config import FULL, SLIDING
    from gemmaforge.models.gemma4.config import Gemma4Config
    from gemmaforge.models.gemma4.vision import Gemma4VisionConfig

    vision = Gemma4VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=6, head_dim=64, patch_size=16, pooling_kernel_size=3,
                                position_embedding_size=1024)
    return Gemma4Config(vocab_size=8192, hidden_size=640, intermediate_size=2560, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=128, global_head_dim=256,
                        sliding_window=256, layer_types=[SLIDING, SLIDING, SLIDING, FULL],
                        hidden_size_per_layer_input=64, vocab_size_per_layer_input=8192,
                        vision_config=vision, boi_token_id=8100, eoi_token_id=8101, image_token_id=8102,
                        video_token_id=8103, boa_token_id=8104, eoa_token_id=8105, audio_token_id=8106)


def samples(cfg, n_docs: int, soft: int, seed: int = 0):
    """(documents as id lists, their images' pixel_values / image_position_ids), reproducible."""
    import numpy as np
    from PIL import Image

    from gemmaforge.data.gemma4_images import Gemma4ImageProcessor

    rng = np.random.default_rng(seed)
    proc = Gemma4ImageProcessor(patch_size=cfg.vision_config.patch_size, max_soft_tokens=soft,
                                pooling_kernel_size=cfg.vision_config.pooling_kernel_size)
    docs, images = [], []
    for _ in range(n_docs):
        h, w = (int(x) for x in rng.integers(64, 900, 2))
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    out = proc(images, return_tensors="pt")
    for n_img in out["num_soft_tokens_per_image"]:
        pre = int(math.exp(rng.uniform(math.log(8), math.log(64))))  # the prompt
        post = int(math.exp(rng.uniform(math.log(16), math.log(1024))))  # the answer: lengths vary widely
        ids = ([2] + rng.integers(3, 8000, pre).tolist() + [cfg.boi_token_id] + [cfg.image_token_id] * n_img
               + [cfg.eoi_token_id] + rng.integers(3, 8000, post).tolist())
        docs.append(ids)
    return docs, out["pixel_values"], out["image_position_ids"]


def labels_of(ids, cfg):
    """Next-token labels: -100 where the next token is an image token or its end marker, and at the end."""
    import torch

    lab = torch.full_like(ids, -100)
    lab[..., :-1] = ids[..., 1:]
    no_loss = (ids == cfg.image_token_id) | (ids == cfg.eoi_token_id)
    lab[..., :-1] = torch.where(no_loss[..., 1:], -100, lab[..., :-1])
    return lab


def build_step(which: str, weights: str, n_docs: int, seq: int, soft: int, threads: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    cfg = bench_config()
    docs, pix, pos = samples(cfg, n_docs, soft)
    if which == "gemmaforge":
        from gemmaforge.data import Document, collate_rows, pack_documents
        from gemmaforge.formats.convert import load_any

        model, _ = load_any(weights, dtype=torch.float32, device="cpu", with_tokenizer=False)
        model.train()
        # a document with media is never split across rows; each row's images in its placeholders' order
        rows = pack_documents([Document(d, media=[i]) for i, d in enumerate(docs)], seq)
        batches = []
        for r in rows:
            b = collate_rows([r])
            idx = list(r.media)
            b["pix"], b["pos"], b["real"] = pix[idx], pos[idx], r.num_real_tokens
            batches.append(b)
        real = sum(len(d) for d in docs)
        slots = sum(b["input_ids"].numel() for b in batches)

        def loss_fn():
            total, count = 0.0, 0
            for b in batches:
                logits = model(b["input_ids"], cu_seqlens=b["cu_seqlens"], pixel_values=b["pix"],
                               image_position_ids=b["pos"])
                lab = labels_of(b["input_ids"], cfg).reshape(-1)
                lab[b["real"] - 1:] = -100  # the row's padding tail, and the last real token
                lab[b["cu_seqlens"][1:].long() - 1] = -100  # no label across a document boundary
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab, reduction="sum")
                n = int((lab != -100).sum())
                loss.backward()
                total += float(loss.detach())
                count += n
            return total / count
    else:
        import transformers

        model = transformers.Gemma4ForConditionalGeneration.from_pretrained(weights, attn_implementation="sdpa",
                                                                            dtype=torch.float32).train()
        L = max(len(x) for x in docs)
        ids = torch.zeros(len(docs), L, dtype=torch.long)
        mask = torch.zeros(len(docs), L, dtype=torch.long)
        for i, x in enumerate(docs):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        types = (ids == cfg.image_token_id).long()
        lab = labels_of(ids, cfg)
        lab[mask == 0] = -100
        for i, x in enumerate(docs):
            lab[i, len(x) - 1] = -100
        real, slots = int(mask.sum()), ids.numel()

        def loss_fn():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_position_ids=pos,
                        mm_token_type_ids=types, use_cache=False)
            flat = lab.reshape(-1)
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), flat, reduction="sum")
            n = int((flat != -100).sum())
            (loss / 1.0).backward()
            return float(loss.detach()) / n

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = loss_fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, real, slots


def serve(which: str, a) -> None:
    step, real, slots = build_step(which, a.weights, a.docs, a.seq, a.soft, a.threads)
    print(json.dumps({"ready": which, "real": real, "slots": slots}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            print(json.dumps({"t": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": loss}),
                  flush=True)
        else:
            print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--soft", type=int, default=70, help="max soft tokens per image (70, 140, 280...)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--weights", default=None)
    a = ap.parse_args()
    if a.worker:
        serve(a.worker, a)
        return
    import tempfile

    import torch

    from gemmaforge import from_config
    from gemmaforge.formats.hf import save_hf

    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    save_hf(from_config(bench_config()), tmp.name + "/w")  # both sides load these weights
    sides = ["gemmaforge", "transformers"]
    procs = {w: subprocess.Popen([sys.executable, __file__, "--worker", w, "--docs", str(a.docs), "--seq", str(a.seq),
                                  "--soft", str(a.soft), "--threads", str(a.threads), "--weights", tmp.name + "/w"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for w in sides}

    def reply(w):
        for line in procs[w].stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"{w} worker died (exit {procs[w].wait()})")

    def ask(w, msg):
        procs[w].stdin.write(msg + "\n")
        procs[w].stdin.flush()
        return reply(w)

    res = {w: {**reply(w), "times": [], "cpu": [], "losses": []} for w in sides}
    for k in range(2 + a.steps):
        for w in sides:
            r = ask(w, "step")
            res[w]["losses"].append(r["loss"])
            if k >= 2:
                res[w]["times"].append(r["t"])
                res[w]["cpu"].append(r["cpu"])
    for w in sides:
        res[w].update(ask(w, "done"))
        procs[w].wait()
    for w, r in res.items():
        r["step_s"] = statistics.median(r["times"])
        r["cpu_s"] = statistics.median(r["cpu"])
        print(f"{w:13s} step {r['step_s']:6.2f}s (CPU {r['cpu_s']:6.2f}s)  {r['real'] / r['step_s']:7.1f} real tokens/s  "
              f"slots {r['slots']} for {r['real']} real tokens ({r['real'] / r['slots']:.0%})  "
              f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB  first loss {r['losses'][0]:.4f}  "
              f"steps {' '.join(f'{t:.2f}' for t in r['times'])}")
    g, t = res["gemmaforge"], res["transformers"]
    pairs = [b / x for x, b in zip(g["times"], t["times"])]
    print(f"gemmaforge vs transformers: speed {t['step_s'] / g['step_s']:.2f}x of medians, {statistics.median(pairs):.2f}x "
          f"median of back-to-back pairs, {t['cpu_s'] / g['cpu_s']:.2f}x in process CPU time; peak RSS {g['peak_rss'] / t['peak_rss']:.2f}x; first-step loss "
          f"difference {abs(g['losses'][0] - t['losses'][0]):.2e}")


if __name__ == "__main__":
    main()
