"""What every command shares: the model flags and the device default."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF dir, .gguf file or preset name (default: the embedded gemma-3-270m)")
    p.add_argument("--text-only", action="store_true", default=None,
                   help="a multimodal checkpoint's text decoder alone (its vision/audio towers not loaded)")
    p.add_argument("--dtype", default="float32", help="float32 (CPU default) or bfloat16 (GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--attn-backend", default=None, choices=["auto", "eager", "sdpa", "flex", "flash"],
                   help="attention kernel (default auto: flash-attn on CUDA where installed, else sdpa)")


def check_device(arg: str | None) -> str:
    """The device to load on (default: cuda if available, else cpu); one-line ``InputError`` for a device
    this machine does not have or that is not a device at all."""
    import torch

    from ..errors import InputError

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(arg)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {arg}: not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cpu":
        return arg
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {arg}: CUDA is not available on this machine (use --device cpu)")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise InputError(f"--device {arg}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''})")
        return arg
    if d.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return arg
    raise InputError(f"--device {arg}: not supported here (use cpu, cuda or cuda:N)")


def check_adapter(arg: str | None) -> None:
    """A LoRA adapter dir must exist and hold ``adapter_config.json`` (checked before the model loads)."""
    from ..errors import InputError

    if arg is None:
        return
    d = Path(arg)
    if not d.exists():
        raise InputError(f"--adapter {arg}: no such directory")
    if not d.is_dir():
        raise InputError(f"--adapter {arg}: not a directory (a PEFT adapter dir holds adapter_config.json)")
    if not (d / "adapter_config.json").is_file():
        raise InputError(f"--adapter {arg}: no adapter_config.json (not a PEFT adapter dir)")
