"""Per-block activation checkpointing, applied from outside the model by wrapping modules.

    from gemmaforge.parallel.checkpointing import apply_activation_checkpointing
    apply_activation_checkpointing(model)          # every decoder layer
    apply_activation_checkpointing(model, every=2) # layers 0, 2, 4, ...

Each selected decoder layer is wrapped, in its place in ``model.model.layers``, by a
``CheckpointedLayer`` that runs it under non-reentrant ``torch.utils.checkpoint.checkpoint``. The
wrapper holds the layer's own submodule, parameter and buffer registries (the same dicts, not
copies), so every name (``model.layers.3.mlp.up_proj.weight``), state dict key, optimizer and
DCP key is unchanged, and forwards other attribute reads (``layer_idx``...) to the layer. The
layer's extra argument (the ``ForwardContext`` with RoPE tables of every layer type and the
document layout) passes through untouched: non-reentrant checkpointing closes over non-tensor
arguments, which is what broke dual-RoPE models under reentrant checkpointing. Module hooks on the
wrapper fire once per call; hooks on the layer's submodules fire again when it is recomputed.

The layers of a multimodal model's towers (every ``layers`` list inside the modules its
``media_specs`` name: SigLIP's encoder layers...) are wrapped the same way, all of them.

A layer runs plainly when grad mode is off, and when its context carries a STATEFUL key source (a
KV cache: recomputing the layer would append its keys/values a second time). A context-parallel key
exchange keeps nothing between calls, so under context parallelism layers are checkpointed and
recompute, gathers included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.common.decoder import decoder_layers
from ..models.common.media import tower_modules


def _stateful_cache(args, kwargs) -> bool:
    return any(getattr(a, "stateful_cache", False) for a in (*args, *kwargs.values()))


class CheckpointedLayer(nn.Module):
    """A decoder layer run under non-reentrant activation checkpointing, under the layer's own names."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # the layer's registries themselves: its submodules, parameters and buffers are this module's
        self._modules = layer._modules
        self._parameters = layer._parameters
        self._buffers = layer._buffers
        self._non_persistent_buffers_set = layer._non_persistent_buffers_set
        object.__setattr__(self, "layer", layer)  # not a child: everything it holds is registered above

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled() or _stateful_cache(args, kwargs):
            return self.layer(*args, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)

    def extra_repr(self) -> str:
        return f"checkpointed {type(self.layer).__name__}"


def is_checkpointed(layer: nn.Module) -> bool:
    return isinstance(layer, CheckpointedLayer)


def unwrapped(layer: nn.Module) -> nn.Module:
    """The decoder layer itself (inside a checkpoint wrapper or not)."""
    return layer.layer if is_checkpointed(layer) else layer


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Checkpoint decoder layers ``0, every, 2*every, ...`` (non-reentrant); returns ``model``.

    Applying again replaces the previous selection (layers are never wrapped twice).
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer; got {every!r}")
    remove_activation_checkpointing(model)
    layers = model.model.layers
    for i, key in enumerate(list(layers.keys())):
        if i % every == 0:
            layers[key] = CheckpointedLayer(layers[key])
    for container in tower_layer_lists(model):
        for key in list(container._modules):
            container._modules[key] = CheckpointedLayer(container._modules[key])
    return model


def tower_layer_lists(model: nn.Module) -> list[nn.Module]:
    """The ``layers`` lists (ModuleList / ModuleDict) inside the model's media towers."""
    specs = getattr(model, "media_specs", None)
    if specs is None:
        return []
    out = []
    for _, tower in tower_modules(model):
        out += [m for n, m in tower.named_modules() if n.rsplit(".", 1)[-1] == "layers"
                and isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    return out


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Put every checkpointed decoder layer back unwrapped; returns ``model``."""
    layers = model.model.layers
    for key in list(layers.keys()):
        layers[key] = unwrapped(layers[key])
    for container in tower_layer_lists(model):
        for key in list(container._modules):
            container._modules[key] = unwrapped(container._modules[key])
    return model


def checkpointed_layers(model: nn.Module) -> list[str]:
    """Names of the decoder layers that currently run checkpointed."""
    return [n for n, layer in decoder_layers(model) if is_checkpointed(layer)]
