"""The LM head: ``logits = hidden @ W.T`` (W ``[vocab, hidden]``, tied to the token embedding in Gemma),
then the final soft-cap ``c * tanh(z / c)`` where the family has one.

Besides the logits, the head computes what training and scoring need without ever forming the
``[tokens, vocab]`` logits: the summed token cross-entropy (``cross_entropy``) and per-token
log-probs and entropies (``logprobs``), in chunks (``gemmaforge.ops.head_loss``). Objectives call
these methods, so a transform that changes how the head's weight is held (a replicated or
vocabulary-sharded tensor under a parallel layout, kept work buffers on CPU) swaps the head module
for a subclass and nothing else changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.head_loss import chunked_cross_entropy, chunked_logprobs


class LMHead(nn.Linear):
    def __init__(self, hidden: int, vocab: int, softcap: float | None = None):
        super().__init__(hidden, vocab, bias=False)
        self.softcap = softcap

    @classmethod
    def sharing(cls, head: "LMHead") -> "LMHead":
        """A head of this class over ``head``'s weight (the same parameter, the same soft-cap)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.softcap = head.in_features, head.out_features, head.softcap
        new.weight = head.weight
        new.register_parameter("bias", None)
        return new

    def matrix(self) -> torch.Tensor:
        """The ``[vocab, hidden]`` weight as the products here use it (a plain tensor)."""
        return self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z = F.linear(hidden, self.matrix())
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
                      reduction: str = "sum") -> torch.Tensor:
        """Token cross-entropy of ``hidden [N, H]`` against ``labels [N]`` (-100 = ignored), summed by
        default (fp32); the logits are formed in chunks, never whole."""
        return chunked_cross_entropy(hidden, self.matrix(), labels, softcap=self.softcap, chunk_size=chunk_size,
                                     reduction=reduction)

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 chunk_size: int = 1024, return_entropy: bool = False):
        """``log softmax(softcap(logits) / temperature)`` at ``targets`` (and the entropy), chunked."""
        return chunked_logprobs(hidden, self.matrix(), targets, softcap=self.softcap, temperature=temperature,
                                chunk_size=chunk_size, return_entropy=return_entropy)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", softcap={self.softcap}" if self.softcap is not None else "")
