"""PEFT adapter files both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

gemmaforge's LoRA parameter names (``...q_proj.lora_A.weight``), prefixed with ``base_model.model.``,
are exactly PEFT's keys for ``Gemma3ForCausalLM``, so adapters move both ways without renaming.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.lora import LoraConfig, LoraLinear, apply_lora, lora_modules
from ..errors import CheckpointError
from .hf import atomic_dir, hf_module_name

PEFT_PREFIX = "base_model.model."


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's keys: ``base_model.model.`` + transformers' module names (a multimodal model's decoder
    under ``model.language_model.``, its towers as named)."""
    return {PEFT_PREFIX + hf_module_name(model, k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them (``dtype``: the
    tensors' on disk, default as trained)."""
    cfg: LoraConfig = model.transforms.lora
    mods = sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)})
    targets = cfg.targets if isinstance(cfg.targets, str) else mods
    if getattr(model.config, "is_multimodal", False):
        # exactly the wrapped modules, by transformers' names (a suffix list would also wrap the towers'
        # same-named layers, a regex over our names would match none of transformers')
        targets = "(" + "|".join(re.escape(hf_module_name(model, n)) for n in sorted(lora_modules(model))) + ")"
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets,
        "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    d = Path(directory)
    with atomic_dir(d) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        state = adapter_state(model)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def _peft_key_to_ours(k: str) -> str:
    k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
    k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    # multimodal checkpoints: model.language_model.layers -> model.layers
    return k.replace("model.language_model.", "model.")


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Wrap ``model`` per the adapter's config and load its weights strictly (names every problem)."""
    d = Path(directory)
    cpath, wpath = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cpath, wpath):
        if not p.exists():
            raise CheckpointError(f"{p}: file not found")
    try:
        conf = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cpath}: not valid JSON ({e.msg})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cpath}: peft_type {conf.get('peft_type')!r} is not LORA")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise CheckpointError(f"{cpath}: per-module rank_pattern/alpha_pattern is not supported")
    sd = {_peft_key_to_ours(k): v for k, v in load_file(str(wpath)).items()}
    wanted_modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    existing = dict(model.named_modules())
    for m in wanted_modules:
        if m not in existing or not isinstance(existing[m], (nn.Linear, LoraLinear)):
            raise CheckpointError(f"{wpath}: adapter targets module {m!r} which the model does not have")
    cfg = LoraConfig(rank=int(conf["r"]), alpha=float(conf.get("lora_alpha", conf["r"])),
                     dropout=float(conf.get("lora_dropout", 0.0)), rslora=bool(conf.get("use_rslora", False)),
                     targets=[re.escape(m) for m in wanted_modules])
    apply_lora(model, cfg)
    model.transforms.lora.targets = conf.get("target_modules") or cfg.targets
    params = dict(model.named_parameters())
    for k, v in sd.items():
        mod = k.rsplit(".lora_", 1)[0]
        if k not in params:
            raise CheckpointError(f"{wpath}: unexpected tensor {k!r} for module {mod!r}")
        if tuple(v.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{wpath}: module {mod!r}: {k.rsplit('.', 2)[-2]} has shape {tuple(v.shape)}, "
                                  f"expected {tuple(params[k].shape)} (rank {cfg.rank})")
        with torch.no_grad():
            params[k].copy_(v)
    missing = [n for n in lora_modules(model) if n + ".lora_A.weight" not in sd or n + ".lora_B.weight" not in sd]
    if missing:
        raise CheckpointError(f"{wpath}: no adapter weights for module {missing[0]!r}")
    return wanted_modules
