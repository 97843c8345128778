"""LoRA applied from outside the model, with PEFT's parameter names (adapter files: ``formats.peft``).

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

import contextlib
import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..ops import packed_linear

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
        self.adapter_enabled = True  # False: the base weight alone (``adapters_disabled``: a DPO/GRPO reference)
        self.packed = packed_linear.PackedWeight()  # the frozen base weight's packed copy while decoding on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            if self.merged:
                raise RuntimeError("a merged LoRA module cannot run with its adapter disabled (unmerge it first)")
            return packed_linear.linear(x, self.weight, self.bias, self.packed)
        if self.merged:
            return packed_linear.linear(x, self.weight, self.bias, self.packed)
        b = self.lora_B.weight
        if x.dtype != self.weight.dtype or b.dtype != self.weight.dtype or self.lora_B.bias is not None \
                or torch.is_autocast_enabled(x.device.type):
            y = F.linear(x, self.weight, self.bias)  # mixed dtypes (autocast) or a biased adapter
            return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        # y += scaling * (A x) B^T as one in-place addmm on the 2-D base output (not a view, and not
        # saved for backward): no [tokens, out] temporaries for the adapter's product, scaling and sum
        x2 = x.reshape(-1, x.shape[-1])
        y = packed_linear.linear(x2, self.weight, self.bias, self.packed)
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
    model.transforms.lora = cfg
    return names


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a Linear-like module applies: its adapter folded in for an unmerged ``LoraLinear``,
    else ``linear.weight`` itself."""
    return linear.effective_weight() if isinstance(linear, LoraLinear) else linear.weight


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every ``LoraLinear`` of ``model`` applies its base weight alone: the model is the
    frozen base it was adapted from, with no second copy in memory (the reference policy of DPO / GRPO).
    A flag each module's ``forward`` reads; restored on exit (also on an exception)."""
    mods = list(lora_modules(model).values())
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b


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
    out.transforms.lora = None
    for p in out.parameters():
        p.requires_grad_(True)
    if getattr(out.config, "tie_word_embeddings", False):
        out.lm_head.weight = out.model.embed_tokens.weight
    return out
