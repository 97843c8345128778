"""Rollout files: ``{"prompt", "completion"}`` / ``{"prompt_ids", "completion_ids"}`` JSONL lines, checked
line by line (one ``DataError`` naming ``file:line``) and encoded to token ids."""

from __future__ import annotations


from ..data.sources import _type_name, jsonl_objects
from ..errors import DataError



def parse_rollouts(path) -> list[tuple[str, dict]]:
    """``(file:line, object)`` for every non-blank line of a JSONL file, with the fields checked.

    Every problem raises a one-line ``DataError`` naming ``file:line``. Needs no model, so a bad
    file fails before the model is loaded.
    """
    records = []
    for line, obj in jsonl_objects(path, "rollout data"):
        where = f"{path}:{line}"
        text = "prompt" in obj or "completion" in obj
        ids = "prompt_ids" in obj or "completion_ids" in obj
        if text and ids:
            raise DataError(f'{where}: ambiguous line: has both "prompt"/"completion" and '
                            f'"prompt_ids"/"completion_ids"')
        if not (text or ids):
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise DataError(f'{where}: expected "prompt"+"completion" or "prompt_ids"+"completion_ids"; '
                            f"got keys {keys}")
        for key in ("prompt", "completion") if text else ("prompt_ids", "completion_ids"):
            if key not in obj:
                raise DataError(f'{where}: line lacks "{key}"')
            v = obj[key]
            if text and not isinstance(v, str):
                raise DataError(f'{where}: "{key}" must be a string, got {_type_name(v)}')
            if not text and (not isinstance(v, list)
                             or not all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
                raise DataError(f'{where}: "{key}" must be a list of integers, got {_type_name(v)}')
        if ids and not obj["prompt_ids"]:
            raise DataError(f'{where}: "prompt_ids" is empty (the first completion token needs a context; '
                            f"start with BOS)")
        records.append((where, obj))
    if not records:
        raise DataError(f"{path}:1: empty file (no JSON lines)")
    return records


def encode_rollouts(records, vocab: int, max_len: int, get_tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, completion_ids)`` of parsed lines: text is tokenized (prompt with BOS,
    completion without, nothing appended; ``get_tokenizer()`` is called once, only if needed),
    ids are range-checked. Problems raise ``DataError`` naming ``file:line``."""
    pairs = []
    tok = None
    for where, obj in records:
        if "prompt" in obj:
            if tok is None:
                tok = get_tokenizer()
            p = list(tok.encode(obj["prompt"], add_bos=True))
            c = list(tok.encode(obj["completion"], add_bos=False))
        else:
            p, c = obj["prompt_ids"], obj["completion_ids"]
            for key, v in (("prompt_ids", p), ("completion_ids", c)):
                bad = [t for t in v if not 0 <= t < vocab]
                if bad:
                    raise DataError(f'{where}: "{key}" has token id {bad[0]} outside the vocabulary '
                                    f"(0..{vocab - 1})")
        if len(p) + len(c) > max_len:
            raise DataError(f"{where}: prompt + completion are {len(p) + len(c)} tokens, longer than the "
                            f"model's context ({max_len})")
        pairs.append((p, c))
    return pairs
