"""Training objectives: what turns a micro-batch and the model's final hidden states into a loss.

An objective is a small object with three parts:

* ``targets(batch) -> {name: [T] tensor}``: the per-token fields it reads (labels, later advantages,
  reference log-probs...). The step slices them with the tokens when a row is split over ranks
  (context parallelism) and sends them through the pipeline schedule (pipeline parallelism).
* ``count(batch) -> int``: how many tokens of the micro-batch count for normalisation. The step
  sums it over the step's micro-batches and the data-parallel ranks: the ONE global count that
  every loss is divided by, so every layout gives the single-process gradient.
* ``loss(model, hidden [N, H], targets) -> scalar``: the SUMMED loss of those tokens (fp32).

The step never looks inside; new objectives (DPO, GRPO) add a class here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class CausalLMLoss:
    """Token cross-entropy against the packed rows' pre-shifted ``labels`` (-100 = no loss), through
    the LM head in chunks of ``chunk_size`` tokens (the ``[T, vocab]`` logits never exist)."""

    chunk_size: int = 1024

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"labels": batch["labels"].reshape(-1)}

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, hidden: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.lm_head.cross_entropy(hidden, targets["labels"], chunk_size=self.chunk_size, reduction="sum")
