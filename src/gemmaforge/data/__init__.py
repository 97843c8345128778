"""Training data: reading sources into documents and packing them into rows.

Sequences are packed by construction: document boundaries travel as explicit
``cu_seqlens`` tensors and are never inferred from token values.
"""

from .packing import (
    IGNORE_INDEX,
    Document,
    PackedRow,
    PackingStats,
    collate_rows,
    pack_documents,
    pack_stream,
    packing_efficiency,
    packing_stats,
    pad_documents,
)
from .sources import (
    END_OF_TURN,
    Tokenizer,
    iter_documents,
    load_documents,
    read_jsonl,
    read_text_file,
    train_val_split,
)

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "PackedRow",
    "PackingStats",
    "collate_rows",
    "pack_documents",
    "pack_stream",
    "packing_efficiency",
    "packing_stats",
    "pad_documents",
    "END_OF_TURN",
    "Tokenizer",
    "iter_documents",
    "load_documents",
    "read_jsonl",
    "read_text_file",
    "train_val_split",
]
