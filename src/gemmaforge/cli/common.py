"""What every command shares: the model flags and the device default."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF dir, .gguf file or preset name (default: the embedded gemma-3-270m)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU default) or bfloat16 (GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--attn-backend", default=None, choices=["auto", "eager", "sdpa", "flex", "flash"])


def device(arg):
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")
