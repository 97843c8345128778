"""The training data stream: the built-in corpus and a deterministic, resumable order over packed rows."""

from __future__ import annotations

import torch


def builtin_corpus() -> list[str]:
    """The Python language reference that ships inside CPython (pydoc_data.topics), one doc per topic."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


class RowStream:
    """Deterministic order over packed rows: a seeded permutation per epoch, position = (epoch, cursor)."""

    def __init__(self, rows: list, seed: int, epoch: int = 0, cursor: int = 0):
        self.rows, self.seed, self.epoch, self.cursor = rows, seed, epoch, cursor
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self):
        if self.cursor >= len(self.rows):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        row = self.rows[self._perm[self.cursor]]
        self.cursor += 1
        return row

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}
