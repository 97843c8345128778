"""Teach the embedded Gemma 3 270M to name a class from synthetic "audio" features.

A projector (RMSNorm + MLP) maps encoder frames ``[B, N, d_encoder]`` into the embedding space and
its outputs are spliced at placeholder positions of the prompt; LoRA (rank 8, all seven
projections) adapts the decoder. Each "recording" is one of 4 random prototype vectors plus noise;
the model must answer with the class word. Loss falls and accuracy rises within a few dozen steps
on 2 CPU cores.

    .venv/bin/python examples/audio_prefix_lora.py [--steps 40] [--out runs/audio-example]

Writes ``curve.png`` (loss and accuracy) and ``metrics.jsonl`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gemmaforge
from gemmaforge.multimodal import Projector, embedding_scale_of
from gemmaforge.adapters.lora import LoraConfig, apply_lora

CLASSES = [" dog", " cat", " bird", " car"]


def make_batch(protos, g, batch, frames, noise):
    cls = torch.randint(0, len(CLASSES), (batch,), generator=g)
    feats = protos[cls][:, None, :] + noise * torch.randn(batch, frames, protos.shape[1], generator=g)
    return feats, cls


@torch.no_grad()
def accuracy(model, proj, ids, pos, class_ids, protos, g, frames, noise, n=64):
    feats, cls = make_batch(protos, g, n, frames, noise)
    logits = model(ids.expand(n, -1), extra_embeds=proj(feats), extra_positions=pos.expand(n, -1))[:, -1]
    pred = logits[:, class_ids].argmax(-1)
    return float((pred == cls).float().mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--d-encoder", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/audio-example")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    model = gemmaforge.from_pretrained(a.model).train()
    tok = gemmaforge.load_tokenizer(a.model)
    apply_lora(model, LoraConfig(rank=8, alpha=16))
    hidden = model.config.hidden_size
    proj = Projector(a.d_encoder, hidden, kind="mlp", out_scale=embedding_scale_of(model))
    class_ids = torch.tensor([tok.encode(c, add_bos=False)[0] for c in CLASSES])

    # prompt: <bos> Sound: [frames x placeholder] . This sound is a   -> class word
    head = tok.encode("Sound:")
    tail = tok.encode(". This sound is a", add_bos=False)
    placeholder = tok.pad_id if tok.pad_id is not None else 0
    ids = torch.tensor([head + [placeholder] * a.frames + tail])
    pos = torch.arange(len(head), len(head) + a.frames)[None]

    g = torch.Generator().manual_seed(a.seed)
    protos = torch.randn(len(CLASSES), a.d_encoder, generator=g)
    eval_g = torch.Generator().manual_seed(a.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad] + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr)
    rows = []
    acc0 = accuracy(model, proj, ids, pos, class_ids, protos, eval_g, a.frames, a.noise)
    print(f"step 0: accuracy {acc0:.2f}")
    from tqdm import tqdm

    for step in tqdm(range(1, a.steps + 1), desc="training", unit="step"):
        t0 = time.perf_counter()
        feats, cls = make_batch(protos, g, a.batch, a.frames, a.noise)
        logits = model(ids.expand(a.batch, -1), extra_embeds=proj(feats), extra_positions=pos.expand(a.batch, -1))
        loss = F.cross_entropy(logits[:, -1].float(), class_ids[cls])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step, "loss": float(loss), "step_s": time.perf_counter() - t0}
        if step % 10 == 0 or step == a.steps:
            row["accuracy"] = accuracy(model, proj, ids, pos, class_ids, protos, eval_g, a.frames, a.noise)
            tqdm.write(f"step {step}: loss {row['loss']:.3f} accuracy {row['accuracy']:.2f}")
        rows.append(row)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _plot(rows, acc0, out / "curve.png")
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    summary = {"loss_first5": first, "loss_last5": last, "accuracy_before": acc0,
               "accuracy_after": rows[-1]["accuracy"], "out": str(out)}
    print(json.dumps(summary))
    return summary


def _plot(rows, acc0, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    acc = [(0, acc0)] + [(r["step"], r["accuracy"]) for r in rows if "accuracy" in r]
    ax2.plot(*zip(*acc), "o-", color="tab:green", label="accuracy")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("accuracy")
    fig.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
