"""LoRA applied from outside the model, in the PEFT on-disk format.

``apply_lora`` swaps each targeted ``nn.Linear`` for a ``LoraLinear`` that keeps the base weight
under the same name (``...q_proj.weight``) and adds ``...q_proj.lora_A.weight`` /
``...q_proj.lora_B.weight``: prefixed with ``base_model.model.`` those are exactly PEFT's keys for
``Gemma3ForCausalLM`` (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``), so
adapters move both ways without renaming. The default targets are all seven projections of every
layer (not only q/v: the SALMONN port's trap). Only ``nn.Linear`` modules are wrapped: on Gemma 4
that is attention (q/k/v/o; KV-sharing layers own no k/v, K=V layers no v) and the dense MLP
(gate/up/down). The packed MoE expert weights (``experts.gate_up_proj``/``experts.down_proj``,
[E, ., .] tensors, not Linear modules) and the router are left alone by the defaults, and a target
naming them, or any other non-Linear module, is an error rather than a silent no-op.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float | None = None  # default: rank (scaling 1)
    dropout: float = 0.0
    targets: list[str] | str | None = None  # names (suffix match) or one regex (full match), as PEFT
    rslora: bool = False

    def __post_init__(self):
        if self.targets is None:
            self.targets = list(DEFAULT_TARGETS)
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive (got {self.rank})")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraLinear(nn.Module):
    """``y = x W^T + scaling * B(A(dropout(x)))``; W frozen, keeps its original parameter name."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        b = self.lora_B.weight
        if x.dtype != self.weight.dtype or b.dtype != self.weight.dtype or self.lora_B.bias is not None \
                or torch.is_autocast_enabled(x.device.type):
            y = F.linear(x, self.weight, self.bias)  # mixed dtypes (autocast) or a biased adapter
            return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        # y += scaling * (A x) B^T as one in-place addmm on the 2-D base output (not a view, and not
        # saved for backward): no [tokens, out] temporaries for the adapter's product, scaling and sum
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.weight, self.bias)
        y.addmm_(self.lora_A(self.dropout(x2)), b.t(), alpha=self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight this module applies: ``W + scaling * B @ A`` (just ``W`` once
        merged), differentiable in the adapters. Equal to ``forward`` without dropout (eval mode or
        ``dropout == 0``); used where a per-input-slice view of the weight is needed
        (``attn.hook_result``, the TransformerLens-style weights of ``gemmaforge.interp``)."""
        if self.merged:
            return self.weight
        return self.weight + self.delta().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.effective_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.out_features}, scaling={self.scaling}"


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) is not None for t in targets)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_supported_targets(model: nn.Module, targets) -> None:
    """A target that names a module LoRA cannot wrap (anything but a Linear) or a packed parameter
    (MoE experts) fails with one line, instead of training nothing there."""
    hint = "LoRA wraps attention (q/k/v/o_proj) and dense MLP (gate/up/down_proj) Linears only"
    for n, m in model.named_modules():
        if n and not isinstance(m, (nn.Linear, LoraLinear)) and ".lora_" not in n and _matches(n, targets):
            raise ConfigError(f"LoRA target {targets!r} names {n} ({type(m).__name__}), not a Linear; {hint}")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in ([targets] if isinstance(targets, str) else targets):
        one = t if isinstance(targets, str) else [t]
        if any(_matches(n, one) for n in linear_names):
            continue
        for n, p in model.named_parameters():
            owner = model.get_submodule(n.rpartition(".")[0])
            if not isinstance(owner, nn.Linear) and _matches(n, one):
                kind = "a packed MoE expert weight" if p.dim() == 3 else "a parameter of a non-Linear module"
                raise ConfigError(f"LoRA target {t!r} names {n} ({kind}, shape {tuple(p.shape)}); {hint}")


def apply_lora(model: nn.Module, cfg: LoraConfig, *, freeze_base: bool = True) -> list[str]:
    """Wrap every targeted Linear; returns the wrapped module names. Only adapters stay trainable."""
    _check_supported_targets(model, cfg.targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
             and not n.endswith(("lora_A", "lora_B")) and _matches(n, cfg.targets)]
    if not names:
        raise CheckpointError(f"LoRA targets {cfg.targets} match no Linear module of the model")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        base = model.get_submodule(n)
        _set_child(model, n, LoraLinear(base, cfg.rank, cfg.scaling, cfg.dropout))
    model.lora_config = cfg
    return names


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a Linear-like module applies: its adapter folded in for an unmerged ``LoraLinear``,
    else ``linear.weight`` itself."""
    return linear.effective_weight() if isinstance(linear, LoraLinear) else linear.weight


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (no LoRA modules) with the adapters folded into the weights."""
    out = copy.deepcopy(model)
    for n, m in lora_modules(out).items():
        _set_child(out, n, m.to_linear())
    if hasattr(out, "lora_config"):
        del out.lora_config
    for p in out.parameters():
        p.requires_grad_(True)
    if getattr(out.config, "tie_word_embeddings", False):
        out.lm_head.weight = out.model.embed_tokens.weight
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name: str | None = None) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them."""
    from safetensors.torch import save_file

    from ..checkpoint.hf import atomic_dir

    cfg: LoraConfig = model.lora_config
    mods = sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)})
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": cfg.targets if isinstance(cfg.targets, str) else mods,
        "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    d = Path(directory)
    with atomic_dir(d) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        save_file(adapter_state(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def _peft_key_to_ours(k: str) -> str:
    k = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
    k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    # multimodal checkpoints: model.language_model.layers -> model.layers
    return k.replace("model.language_model.", "model.")


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Wrap ``model`` per the adapter's config and load its weights strictly (names every problem)."""
    from safetensors.torch import load_file

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
    model.lora_config.targets = conf.get("target_modules") or cfg.targets
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
