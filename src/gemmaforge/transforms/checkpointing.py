"""Per-block activation checkpointing, applied from outside the model.

    from gemmaforge.transforms.checkpointing import apply_activation_checkpointing
    apply_activation_checkpointing(model)          # every decoder layer
    apply_activation_checkpointing(model, every=2) # layers 0, 2, 4, ...

Each selected decoder layer keeps its class, its place in ``model.model.layers`` and therefore
every parameter name and state_dict key (``model.layers.N....``); only the layer *instance*'s
``forward`` is replaced by one that runs the original forward under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. Module hooks registered on the
layer still fire once per call (they run in ``__call__``, outside the checkpointed region); hooks
on its submodules fire again when the block is recomputed during backward.

The layer's extra arguments (the ``ForwardContext`` with RoPE tables of every layer type and the
document layout) pass through untouched: non-reentrant checkpointing closes over non-tensor
arguments instead of requiring every input to be a tensor, which is what broke dual-RoPE models
under reentrant checkpointing.

Checkpointing is skipped (the layer runs plainly) when grad mode is off, and when the context
carries a KV cache: recomputing a layer would append its keys/values to the cache a second time.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_INNER = "_gf_ckpt_inner"  # the forward the checkpointed one calls (set on the layer instance)
_HAD_OWN = "_gf_ckpt_had_instance_forward"  # whether that forward was itself an instance attribute


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of the model's decoder blocks, in order."""
    for prefix, owner in (("model.", getattr(model, "model", None)), ("", model)):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if isinstance(layers, nn.ModuleDict):
            return [(f"{prefix}layers.{k}", m) for k, m in layers.items()]
        if isinstance(layers, nn.ModuleList):
            return [(f"{prefix}layers.{i}", m) for i, m in enumerate(layers)]
    raise TypeError(f"{type(model).__name__}: no decoder layers found (expected model.model.layers or model.layers)")


def _uses_cache(args, kwargs) -> bool:
    return any(getattr(a, "cache", None) is not None for a in (*args, *kwargs.values())
               if not isinstance(a, torch.Tensor))


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    inner = getattr(self, _INNER)
    if not torch.is_grad_enabled() or _uses_cache(args, kwargs):
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def is_checkpointed(layer: nn.Module) -> bool:
    return _INNER in layer.__dict__


def _wrap(layer: nn.Module) -> None:
    own = layer.__dict__.get("forward")  # e.g. another transform's per-instance forward
    object.__setattr__(layer, _HAD_OWN, own is not None)
    object.__setattr__(layer, _INNER, own if own is not None else layer.forward)
    object.__setattr__(layer, "forward", types.MethodType(_checkpointed_forward, layer))


def _unwrap(layer: nn.Module) -> None:
    inner = layer.__dict__.pop(_INNER)
    had_own = layer.__dict__.pop(_HAD_OWN)
    del layer.__dict__["forward"]
    if had_own:
        object.__setattr__(layer, "forward", inner)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> nn.Module:
    """Checkpoint decoder layers ``0, every, 2*every, ...`` (non-reentrant); returns ``model``.

    Applying again replaces the previous selection (layers are never wrapped twice).
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer; got {every!r}")
    remove_activation_checkpointing(model)
    for i, (_, layer) in enumerate(decoder_layers(model)):
        if i % every == 0:
            _wrap(layer)
    return model


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Restore the plain forward of every checkpointed decoder layer; returns ``model``."""
    for _, layer in decoder_layers(model):
        if is_checkpointed(layer):
            _unwrap(layer)
    return model


def checkpointed_layers(model: nn.Module) -> list[str]:
    """Names of the decoder layers that currently run checkpointed."""
    return [n for n, layer in decoder_layers(model) if is_checkpointed(layer)]
