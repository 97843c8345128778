"""Evaluation: the loss, perplexity and token count of a model on documents, through the training step.

There is no second loss loop: documents are packed into rows exactly as for training
(``pack_documents``, loss masks honoured), collated, and run through ``step.forward_backward(...,
backward=False)`` with the training objective, which returns the loss summed over every valid label
divided by their (global) count. ``gemmaforge eval`` and ``Trainer.evaluate`` both call
``evaluate_rows``; the loss is the mean over the valid labels, the perplexity ``exp`` of it.

A document longer than ``seq_len`` is cut into ``seq_len`` pieces (as in training): the first token
of each later piece is then not predicted, so the token count is the labels of the packed rows.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import Document, PackedRow, collate_rows, pack_documents
from .objectives import CausalLMLoss
from .step import StepLayout, forward_backward

Progress = Callable[[int, int], None]  # (rows done, rows in all)


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` where that overflows a float (a loss above ~709), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def batch_rows(seq_len: int, batch_tokens: int | None) -> int:
    """Rows per forward for a budget of ``batch_tokens`` tokens (at least one row)."""
    return max(1, (batch_tokens or seq_len) // seq_len)


def evaluate_rows(model: nn.Module, rows: Sequence[PackedRow], objective=None, layout: StepLayout | None = None, *,
                  rows_per_batch: int = 1, autocast: torch.dtype | None = None,
                  progress: Progress | None = None) -> dict | None:
    """The objective's mean loss over every valid label of ``rows`` (packed rows of one length).

    Runs ``forward_backward(..., backward=False)`` under ``torch.no_grad()`` with the model in eval
    mode (its training mode is restored). Without ``progress``: one call over every batch (what the
    Trainer's validation does: under a parallel layout every rank passes its share, as many rows as
    the others). With ``progress``: one call per batch of ``rows_per_batch`` rows, reported after
    each as ``progress(rows done, rows in all)``; the per-call means are recombined by their counts.

    Returns ``{"loss", "perplexity", "tokens" (valid labels), "rows", "positions" (row slots, padding
    included)}``, or None when there are no rows or no valid label."""
    rows = list(rows)
    if not rows:
        return None
    objective = objective or CausalLMLoss()
    per = max(1, int(rows_per_batch))
    spans = [(i, min(i + per, len(rows))) for i in range(0, len(rows), per)]
    was = model.training
    model.eval()
    results = []
    try:
        with torch.no_grad():
            if progress is None:
                batches = [collate_rows(rows[a:b]) for a, b in spans]
                results.append(forward_backward(model, batches, objective, layout, backward=False,
                                                autocast=autocast))
            else:
                progress(0, len(rows))
                for a, b in spans:
                    results.append(forward_backward(model, [collate_rows(rows[a:b])], objective, layout,
                                                    backward=False, autocast=autocast))
                    progress(b, len(rows))
    finally:
        model.train(was)
    count = sum(r.count for r in results)
    if count == 0:
        return None
    # one call: its loss as computed; several: their sums (mean * count) over the total count
    loss = results[0].loss if len(results) == 1 else sum(r.loss * r.count for r in results) / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count, "rows": len(rows),
            "positions": sum(r.tokens for r in results)}


def evaluate(model: nn.Module, docs: Sequence[Document], seq_len: int, *, batch_tokens: int | None = None,
             objective=None, layout: StepLayout | None = None, autocast: torch.dtype | None = None,
             progress: Progress | None = None) -> dict | None:
    """Pack ``docs`` into rows of ``seq_len`` tokens (as training does) and evaluate them, ``batch_tokens``
    tokens per forward (default: one row). Returns ``evaluate_rows``'s dict plus ``documents`` and
    ``seq_len``, or None when no document has a label."""
    docs = list(docs)
    rows = pack_documents(docs, seq_len)
    res = evaluate_rows(model, rows, objective, layout, rows_per_batch=batch_rows(seq_len, batch_tokens),
                        autocast=autocast, progress=progress)
    if res is None:
        return None
    return {**res, "documents": len(docs), "seq_len": seq_len}
