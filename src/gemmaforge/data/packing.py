"""Sequence packing with explicit document boundaries.

Several documents share one row of exactly ``seq_len`` tokens. Boundaries are never
inferred from token values: every row carries ``cu_seqlens`` (``[0, len_1, len_1+len_2,
..., T]``, int32), the form varlen attention kernels take directly.

Label convention: labels are *pre-shifted*. ``labels[t]`` is the token that position
``t`` must predict, i.e. ``input_ids[t+1]`` when ``t+1`` is in the same segment and that
token's ``loss_mask`` is True, otherwise ``-100``. The loss is therefore
``cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`` with no
further shifting, and the last token of a document never predicts the first token of
the next one.

Padding (at the end of a row only) is its own final segment in ``cu_seqlens``: pad
tokens attend only to each other, carry ``-100`` labels and restart ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "PackedRow",
    "PackingStats",
    "pack_documents",
    "pack_stream",
    "collate_rows",
    "packing_efficiency",
    "packing_stats",
    "pad_documents",
]


@dataclass
class Document:
    """One training document.

    ``loss_mask[i]`` says whether token ``i`` may be a *target* (be predicted from
    token ``i-1``). ``None`` means every token may be a target (pretraining text).
    """

    ids: list[int]
    loss_mask: list[bool] | None = None
    # media items (``data.processor.MediaRef``), in the order of their placeholder tokens in ``ids``;
    # a document with media is never split across rows
    media: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ids, torch.Tensor):
            self.ids = self.ids.tolist()
        elif not isinstance(self.ids, list):
            self.ids = list(self.ids)
        if self.loss_mask is not None:
            if isinstance(self.loss_mask, torch.Tensor):
                self.loss_mask = [bool(x) for x in self.loss_mask.tolist()]
            elif not isinstance(self.loss_mask, list):
                self.loss_mask = list(self.loss_mask)
            if len(self.loss_mask) != len(self.ids):
                raise ValueError(
                    f"Document: loss_mask has {len(self.loss_mask)} entries but ids has {len(self.ids)}"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self) -> list[bool]:
        """The loss mask with ``None`` expanded to all-True."""
        return [True] * len(self.ids) if self.loss_mask is None else self.loss_mask

    @property
    def num_targets(self) -> int:
        """Number of labels this document yields on its own (unsplit): masked tokens after the first."""
        if self.loss_mask is None:
            return max(len(self.ids) - 1, 0)
        return sum(1 for m in self.loss_mask[1:] if m)


@dataclass
class PackedRow:
    """One packed row of ``T = seq_len`` tokens.

    ``doc_spans[k] = (doc_index, start, length)`` says which slice of which input
    document (index into the list given to :func:`pack_documents`) real segment ``k``
    holds; the padding segment, if any, is the last entry of ``cu_seqlens`` and has no span.
    """

    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], pre-shifted, -100 = ignore
    cu_seqlens: torch.Tensor  # int32 [n_segments + 1], padding segment included
    position_ids: torch.Tensor  # int64 [T], restart at 0 in every segment
    num_real_tokens: int
    doc_spans: tuple[tuple[int, int, int], ...] = field(default=())
    media: tuple = ()  # the media items of the row's documents, in order (``Document.media``)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_pad_tokens(self) -> int:
        return self.seq_len - self.num_real_tokens


@dataclass(frozen=True)
class PackingStats:
    rows: int
    docs: int  # distinct input documents present
    split_docs: int  # input documents cut into more than one piece
    tokens: int  # real tokens
    pad_tokens: int
    efficiency: float  # tokens / (rows * seq_len)

    @classmethod
    def from_rows(cls, rows: Sequence[PackedRow]) -> "PackingStats":
        pieces: dict[int, int] = {}
        for r in rows:
            for d, _, _ in r.doc_spans:
                pieces[d] = pieces.get(d, 0) + 1
        tokens = sum(r.num_real_tokens for r in rows)
        slots = sum(r.seq_len for r in rows)
        return cls(
            rows=len(rows),
            docs=len(pieces),
            split_docs=sum(1 for n in pieces.values() if n > 1),
            tokens=tokens,
            pad_tokens=slots - tokens,
            efficiency=tokens / slots if slots else 0.0,
        )

    def __str__(self) -> str:
        return (
            f"{self.rows} rows, {self.docs} docs ({self.split_docs} split), "
            f"{self.tokens} tokens + {self.pad_tokens} pad, efficiency {self.efficiency:.1%}"
        )


def packing_stats(rows: Sequence[PackedRow]) -> PackingStats:
    return PackingStats.from_rows(rows)


def packing_efficiency(rows: Sequence[PackedRow]) -> float:
    """Fraction of row slots holding real (non-padding) tokens; 0.0 for no rows."""
    slots = sum(r.seq_len for r in rows)
    return sum(r.num_real_tokens for r in rows) / slots if slots else 0.0


# --------------------------------------------------------------------------- building rows

Piece = tuple[int, int, int]  # (doc index, start, length)


def _build_rows(docs, bins: Sequence[Sequence[Piece]], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Materialise rows from their pieces, vectorised over all rows at once.

    ``docs`` is anything indexable by document index (a list, or a dict when streaming).
    """
    if not bins:
        return []
    ids: list[int] = []
    mask: list[bool] = []
    pos: list[int] = []
    cu_rows: list[list[int]] = []
    row_real: list[int] = []
    row_media: list[tuple] = []
    for pieces in bins:
        cu = [0]
        media: list = []
        for d, s, n in pieces:
            doc = docs[d]
            if doc.media:
                if s != 0 or n != len(doc.ids):
                    raise DataError(f"a document with {len(doc.media)} media item(s) has {len(doc.ids)} tokens, more "
                                    f"than seq_len {seq_len}: documents with images are never split; raise --seq-len")
                media.extend(doc.media)
            ids.extend(doc.ids[s : s + n])
            if doc.loss_mask is None:
                mask.extend([True] * n)
            else:
                mask.extend(doc.loss_mask[s : s + n])
            pos.extend(range(n))
            cu.append(cu[-1] + n)
        used = cu[-1]
        if used > seq_len:  # internal invariant
            raise AssertionError(f"row overfilled: {used} > {seq_len}")
        pad = seq_len - used
        if pad:
            ids.extend([pad_id] * pad)
            mask.extend([False] * pad)
            pos.extend(range(pad))
            cu.append(seq_len)
        cu_rows.append(cu)
        row_real.append(used)
        row_media.append(tuple(media))

    # numpy for the list -> array conversions and elementwise work: far less per-call
    # overhead than torch on CPU for row-sized arrays.
    R, N = len(bins), len(ids)
    flat_ids = np.fromiter(ids, dtype=np.int64, count=N)
    flat_mask = np.fromiter(mask, dtype=np.bool_, count=N)
    flat_pos = np.fromiter(pos, dtype=np.int64, count=N)
    # A position is the start of a segment iff its position id is 0, so "t+1 is in the same
    # segment" is flat_pos[t+1] > 0. Segments never cross rows: every row ends with -100.
    flat_labels = np.full(N, IGNORE_INDEX, dtype=np.int64)
    ok = (flat_pos[1:] > 0) & flat_mask[1:]
    flat_labels[:-1] = np.where(ok, flat_ids[1:], IGNORE_INDEX)

    ids_rows = flat_ids.reshape(R, seq_len)
    labels_rows = flat_labels.reshape(R, seq_len)
    pos_rows = flat_pos.reshape(R, seq_len)
    # .copy(): each row owns its storage (pickling a view would ship the whole chunk).
    return [
        PackedRow(
            input_ids=torch.from_numpy(ids_rows[r].copy()),
            labels=torch.from_numpy(labels_rows[r].copy()),
            cu_seqlens=torch.tensor(cu_rows[r], dtype=torch.int32),
            position_ids=torch.from_numpy(pos_rows[r].copy()),
            num_real_tokens=row_real[r],
            doc_spans=tuple(bins[r]),
            media=row_media[r],
        )
        for r in range(R)
    ]


_CHUNK_ROWS = 512  # rows materialised per vectorised pass (bounds temporary memory)


def _build_all(docs, bins: Sequence[Sequence[Piece]], seq_len: int, pad_id: int) -> list[PackedRow]:
    out: list[PackedRow] = []
    for i in range(0, len(bins), _CHUNK_ROWS):
        out.extend(_build_rows(docs, bins[i : i + _CHUNK_ROWS], seq_len, pad_id))
    return out


def _check_args(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")


def _pieces_of(docs: Sequence[Document], seq_len: int) -> list[Piece]:
    """Every document cut into seq_len-sized pieces (the last one shorter), in input order."""
    out: list[Piece] = []
    for d, doc in enumerate(docs):
        n = len(doc.ids)
        for s in range(0, n, seq_len):
            out.append((d, s, min(seq_len, n - s)))
    return out


def _ffd(pieces: list[Piece], seq_len: int) -> list[list[Piece]]:
    """First-fit-decreasing in O(n log n): a max segment tree over bin capacities.

    Bins not yet opened sit at capacity ``seq_len``, so the leftmost bin that fits is
    either an open one or the next fresh one: exactly first-fit.
    """
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i][2])  # stable: ties keep input order
    size = 1
    while size < max(len(pieces), 1):
        size *= 2
    tree = [seq_len] * (2 * size)
    bins: list[list[Piece]] = []
    for i in order:
        need = pieces[i][2]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        if b == len(bins):
            bins.append([])
        bins[b].append(pieces[i])
    for b in bins:
        b.sort()  # within a row: input order, and a split document's pieces in order
    return bins


def _greedy_bins(docs: Iterable[Document], seq_len: int, keep: dict | None = None) -> Iterator[list[Piece]]:
    """In-order concatenation cut at row ends; yields each row's pieces once it is full,
    then the final partial row. ``keep`` (if given) holds the documents the pending row uses."""
    pieces: list[Piece] = []
    used = 0
    for d, doc in enumerate(docs):
        n = len(doc.ids)
        if keep is not None and n:
            keep[d] = doc
        s = 0
        while s < n:
            take = min(seq_len - used, n - s)
            pieces.append((d, s, take))
            used += take
            s += take
            if used == seq_len:
                yield pieces
                pieces, used = [], 0
                if keep is not None:
                    for old in [k for k in keep if k != d]:
                        del keep[old]
    if pieces:
        yield pieces


def pack_stream(
    docs: Iterable[Document], seq_len: int, *, pad_id: int = 0, drop_last: bool = False
) -> Iterator[PackedRow]:
    """Greedy streaming packing: concatenate documents in order, cutting at row ends.

    Yields each row as soon as it is full; the final partial row is padded (or
    dropped with ``drop_last``). ``doc_spans`` index documents by their position in
    ``docs``. Memory is O(seq_len) plus the documents of the current row.
    """
    _check_args(seq_len)
    held: dict[int, Document] = {}
    for pieces in _greedy_bins(docs, seq_len, held):
        if drop_last and sum(p[2] for p in pieces) < seq_len:
            return
        # The generator prunes ``held`` only after we return to it, so it covers this row.
        yield _build_rows(held, [pieces], seq_len, pad_id)[0]


def pack_documents(
    docs: Sequence[Document], seq_len: int, *, strategy: str = "ffd", pad_id: int = 0
) -> list[PackedRow]:
    """Pack documents into rows of exactly ``seq_len`` tokens.

    ``strategy="ffd"``: first-fit-decreasing bin packing (documents reordered across
    rows to minimise padding). ``strategy="greedy"``: in-order concatenation, cutting
    documents at row ends (see :func:`pack_stream`).

    With "ffd", documents longer than ``seq_len`` are cut into ``seq_len``-sized
    pieces, each its own segment. Nothing is dropped; empty documents contribute
    nothing. Output is deterministic for a given input order.
    """
    _check_args(seq_len)
    docs = list(docs)
    if strategy == "greedy":
        bins = list(_greedy_bins(docs, seq_len))
    elif strategy == "ffd":
        bins = _ffd(_pieces_of(docs, seq_len), seq_len)
    else:
        raise ValueError(f"unknown packing strategy {strategy!r} (expected 'ffd' or 'greedy')")
    return _build_all(docs, bins, seq_len, pad_id)


# --------------------------------------------------------------------------- batching


def collate_rows(rows: Sequence[PackedRow]) -> dict:
    """Stack B rows of length T.

    Returns ``input_ids``, ``labels``, ``position_ids`` (int64 ``[B, T]``),
    ``cu_seqlens`` (int32, boundaries for the flattened ``[B*T]`` view, row ``b``'s
    offsets shifted by ``b*T``), ``max_seqlen`` (int, longest segment) and
    ``num_valid_labels`` (int, labels != -100).
    """
    if not rows:
        raise ValueError("collate_rows: no rows")
    T = rows[0].seq_len
    for r in rows:
        if r.seq_len != T:
            raise ValueError(f"collate_rows: rows have different lengths ({T} and {r.seq_len})")
    input_ids = torch.stack([r.input_ids for r in rows])
    labels = torch.stack([r.labels for r in rows])
    position_ids = torch.stack([r.position_ids for r in rows])
    parts = [r.cu_seqlens[:-1].to(torch.int64) + b * T for b, r in enumerate(rows)]
    parts.append(torch.tensor([len(rows) * T], dtype=torch.int64))
    cu = torch.cat(parts).to(torch.int32)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu,
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        "num_valid_labels": int((labels != IGNORE_INDEX).sum()),
    }
    media = [m for r in rows for m in r.media]
    if media:  # row-major, as the model reads the placeholders of the flattened rows
        out["media"] = media
    return out


def pad_documents(docs: Sequence[Document], pad_id: int = 0, side: str = "right") -> dict:
    """Classic padded batch, one document per row, for comparison with packing.

    Returns ``input_ids`` and ``labels`` (int64 ``[B, S]``, S = longest document) and
    ``attention_mask`` (int64, 1 = real token). Labels follow the packed convention
    (pre-shifted, ``loss_mask`` honoured, -100 on padding and on each document's last token).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    docs = list(docs)
    if not docs:
        raise ValueError("pad_documents: no documents")
    S = max(len(d.ids) for d in docs)
    B = len(docs)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b, doc in enumerate(docs):
        n = len(doc.ids)
        if n == 0:
            continue
        off = 0 if side == "right" else S - n
        ids = torch.tensor(doc.ids, dtype=torch.long)
        mask = torch.tensor(doc.mask(), dtype=torch.bool)
        input_ids[b, off : off + n] = ids
        attention_mask[b, off : off + n] = 1
        if n > 1:
            labels[b, off : off + n - 1] = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
