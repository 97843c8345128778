"""Multi-process workers of the Gemma 3 / Gemma 4 tower FSDP2 tests (spawned by ``parallel.process.launch``)."""

from __future__ import annotations


def mm_config(model_dir: str, data: str, out: str, **over):
    from gemmaforge.train import TrainConfig

    base = dict(model=model_dir, data=[data], steps=3, lr=3e-3, eps=1e-4, seq_len=64, batch_tokens=256,
                micro_batch_rows=2, dtype="float32", out=out, save_every=0, val_fraction=0.0, warmup_steps=0,
                progress=False, seed=1)
    base.update(over)
    return TrainConfig(**base)


def run_mm(rank: int, world: int, model_dir: str, data: str, out: str, over: dict):
    """The Trainer at FSDP2 x world on the multimodal model dir: its metrics rows, exported weights, and
    the FSDP2 module classes found inside the towers."""
    import torch

    from gemmaforge.formats.hf import read_safetensors
    from gemmaforge.parallel.dims import ParallelDims
    from gemmaforge.train import Trainer, read_metrics

    t = Trainer(mm_config(model_dir, data, out, **over), dims=ParallelDims(dp_shard=world))
    sharded = sorted({n.split("_tower")[0].rsplit(".", 1)[-1] for n, m in t.model.named_modules()
                      if "_tower" in n and type(m).__name__.startswith("FSDP")})
    t.run()
    if rank != 0:
        return None
    from pathlib import Path

    weights = read_safetensors(sorted(Path(out, "final").glob("*.safetensors")))
    return dict(metrics=read_metrics(f"{out}/metrics.jsonl"), sharded=sharded,
                weights={k: v.to(torch.float32) for k, v in weights.items()})
