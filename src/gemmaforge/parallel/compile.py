"""``torch.compile`` of each decoder block, applied from outside the model."""

from __future__ import annotations

from torch import nn

from ..models.common.decoder import decoder_layers


def compile_blocks(model: nn.Module, backend: str | None = None, **kw) -> nn.Module:
    """``torch.compile`` every decoder block in place (``nn.Module.compile``: names and parameters unchanged).

    Per block, not the whole model: the blocks are where the FLOPs are, one compiled graph serves
    every block of a layer type, and FSDP2 / activation checkpointing keep working on the same
    block boundaries. ``backend=None`` is inductor.
    """
    for _, layer in decoder_layers(model):
        layer.compile(backend=backend or "inductor", **kw)
    return model
