"""Token embeddings shared by the families.

``Embedding`` is ``nn.Embedding`` that skips its random init on the meta device: checkpoint loads
build the model on ``meta`` and assign real tensors, and ``normal_`` on a meta tensor runs through
``torch._refs``, whose first use imports ``torch._dynamo`` (~4 s of a 5 s load, for nothing).
"""

from __future__ import annotations

import torch
from torch import nn


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def table(self) -> torch.Tensor:
        """The whole ``[vocab, dim]`` table as a plain tensor, unscaled: for code that reads the table
        itself rather than looking rows up (a parallel layout's subclass gathers its shards here)."""
        return self.weight


class ScaledEmbedding(Embedding):
    """Gemma: ``embedding(ids) * scale``, the scale cast to the weight dtype first as the reference
    does (bf16: sqrt(640) = 25.30 becomes 25.25)."""

    def __init__(self, vocab: int, hidden: int, pad_id: int | None, scale: float):
        super().__init__(vocab, hidden, padding_idx=pad_id)
        self.scale = scale

    def factor(self) -> torch.Tensor:
        """The multiplier actually applied: ``scale`` rounded to the weight dtype."""
        return torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.factor()
