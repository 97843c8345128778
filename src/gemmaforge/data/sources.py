"""Read training data into :class:`~gemmaforge.data.packing.Document` objects.

Formats:

* ``.txt``: one document per file (loss on every token). A directory is read
  recursively for ``*.txt`` files, in sorted path order.
* ``.jsonl``: one document per non-blank line, each a JSON object with one of

  - ``{"text": str}``: pretraining, loss on every token;
  - ``{"prompt": str, "completion": str}``: loss on the completion tokens and EOS only;
  - ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
    tokenizer's chat template; loss on the model turns' content and their
    ``<end_of_turn>`` only (the "\n" after it, the prompts and the final EOS are not trained). Roles: ``system`` (first message only), then ``user`` and
    ``model`` (``assistant`` accepted as an alias) alternating, starting with ``user``.

  Other keys on a line are ignored.

Every document starts with BOS and ends with EOS. Prompt/completion and chat data are
tokenized piecewise (untrained text, trained text, ...) so the loss-mask boundary falls
exactly between tokens.

Problems with the data raise :class:`gemmaforge.errors.DataError` with a one-line
message ``file:line: problem`` (``path: problem`` when no line applies, e.g. a missing
path or a directory without ``.txt`` files).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator, Protocol, Sequence, Union

from ..errors import DataError, GemmaforgeError

from .packing import Document

__all__ = [
    "Tokenizer",
    "END_OF_TURN",
    "load_documents",
    "iter_documents",
    "read_text_file",
    "read_jsonl",
    "train_val_split",
]

PathLike = Union[str, "os.PathLike[str]"]

END_OF_TURN = "<end_of_turn>"
_ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model"}


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


def _where(path: PathLike, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else f"{path}"


def _err(path: PathLike, line: int | None, msg: str) -> DataError:
    return DataError(f"{_where(path, line)}: {msg}")


def _type_name(x: object) -> str:
    return "null" if x is None else type(x).__name__


# --------------------------------------------------------------------------- text files


def read_text_file(path: PathLike, tokenizer: Tokenizer) -> Document:
    """One ``.txt`` file as one document: BOS + text + EOS, loss on every token."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise _err(path, None, "no such file or directory") from None
    except OSError as e:
        raise _err(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _err(path, line, f"not valid UTF-8 (byte {raw[e.start]:#04x})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise _err(path, 1, "empty file")
    return Document(list(tokenizer.encode(text, add_bos=True)) + [tokenizer.eos_id])


# --------------------------------------------------------------------------- jsonl


def _str_field(obj: dict, key: str, path: PathLike, line: int) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise _err(path, line, f'"{key}" must be a string, got {_type_name(v)}')
    return v


def _encode_pieces(tokenizer: Tokenizer, pieces: Sequence[tuple[str, bool]], *, eos_trained: bool) -> Document:
    """Tokenize ``(text, trained)`` pieces one by one (BOS with the first) and append EOS."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, (text, trained) in enumerate(pieces):
        if not text and k > 0:
            continue
        toks = list(tokenizer.encode(text, add_bos=(k == 0)))
        ids.extend(toks)
        mask.extend([trained] * len(toks))
    if not ids or ids[0] != tokenizer.bos_id:  # e.g. encode("", add_bos=True) == []
        ids.insert(0, tokenizer.bos_id)
        mask.insert(0, False)
    mask[0] = False  # BOS is never a target
    ids.append(tokenizer.eos_id)
    mask.append(eos_trained)
    return Document(ids, mask)


def _prompt_completion(obj: dict, path: PathLike, line: int, tokenizer: Tokenizer) -> Document:
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _err(path, line, f'"prompt"/"completion" line lacks "{key}"')
    prompt = _str_field(obj, "prompt", path, line)
    completion = _str_field(obj, "completion", path, line)
    if not completion:
        raise _err(path, line, '"completion" is empty (nothing to train on)')
    return _encode_pieces(tokenizer, [(prompt, False), (completion, True)], eos_trained=True)


def _check_messages(obj: dict, path: PathLike, line: int) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise _err(path, line, f'"messages" must be a list, got {_type_name(msgs)}')
    if not msgs:
        raise _err(path, line, '"messages" is empty')
    out: list[dict] = []
    expect = "user"
    for i, m in enumerate(msgs):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(path, line, f"{w} must be an object, got {_type_name(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise _err(path, line, f'{w} lacks "{key}"')
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise _err(path, line, f'{w}: "role" must be a string, got {_type_name(role)}')
        if isinstance(content, list):
            _check_parts(content, w, path, line)
        elif not isinstance(content, str):
            raise _err(path, line, f'{w}: "content" must be a string, got {_type_name(content)} (or a list of parts)')
        if role not in _ROLES:
            raise _err(path, line, f"{w}: unknown role {role!r} (expected system, user, model or assistant)")
        kind = _ROLES[role]
        if kind == "system":
            if i != 0:
                raise _err(path, line, f"{w}: a system message may only come first")
        elif kind != expect:
            raise _err(path, line, f"{w}: expected a {expect} turn, got {role!r} (turns must alternate user/model)")
        else:
            expect = "model" if kind == "user" else "user"
        out.append({"role": role, "content": content})
    if not any(_ROLES[m["role"]] == "model" for m in out):
        raise _err(path, line, "conversation has no model/assistant turn (nothing to train on)")
    return out


def _check_parts(parts: list, w: str, path: PathLike, line: int) -> None:
    for j, part in enumerate(parts):
        where = f"{w}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _err(path, line, f'{where} must be an object with a "type"')
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise _err(path, line, f'{where}: a text part needs a string "text"')
        elif not isinstance(part.get("path"), str):
            raise _err(path, line, f'{where}: a {part["type"]} part needs a string "path" (relative to the JSONL file)')


def _media(msgs: list[dict], path: PathLike, line: int, tokenizer) -> list:
    """The media parts of ``msgs`` as ``MediaRef`` s (paths relative to the JSONL file), each checked
    readable; a media part given to a model without that tower is refused."""
    from .processor import MediaRef

    refs = []
    base = Path(path).parent
    for m in msgs:
        if not isinstance(m["content"], list):
            continue
        for part in m["content"]:
            t = part["type"]
            if t == "text":
                continue
            handler = tokenizer.handler_for(t) if hasattr(tokenizer, "handler_for") else None
            if handler is None:
                raise _err(path, line, f"{t} part given to a text-only model (no {t} tower): "
                                       "train a multimodal checkpoint, or drop the media")
            p = Path(part["path"])
            p = p if p.is_absolute() else base / p
            try:
                handler.check(p)
            except GemmaforgeError as e:
                raise _err(path, line, str(e)) from None
            refs.append(MediaRef(handler, str(p)))
    return refs


def _expand_per_item(pieces: list[tuple[str, bool]], media: list, path: PathLike, line: int):
    """The markers of handlers whose expansion depends on the item (Gemma 4: an image's size, a clip's
    length) replaced, in order across ``pieces``, by each item's own expansion (``expansion_of``)."""
    queues: dict[int, tuple[object, list[str]]] = {}
    for r in media:
        if r.handler.fixed_expansion is None:
            try:
                exp = r.handler.expansion_of(r.source)
            except GemmaforgeError as e:
                raise _err(path, line, str(e)) from None
            queues.setdefault(id(r.handler), (r.handler, []))[1].append(exp)
    out = []
    for text, trained in pieces:
        for handler, q in queues.values():
            parts = text.split(handler.marker)
            if len(parts) - 1 > len(q):
                raise _err(path, line, f"more {handler.modality} markers than {handler.modality} parts")
            text = parts[0] + "".join(q.pop(0) + p for p in parts[1:])
        out.append((text, trained))
    return out


def _chat(obj: dict, path: PathLike, line: int, tokenizer: Tokenizer) -> Document:
    msgs = _check_messages(obj, path, line)
    media = _media(msgs, path, line, tokenizer)
    full = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for k, m in enumerate(msgs):
        if _ROLES[m["role"]] != "model":
            continue
        before = tokenizer.apply_chat_template(msgs[:k], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(msgs[: k + 1], add_generation_prompt=False)
        if not (
            full.startswith(through) and through.startswith(before) and cursor <= len(before) <= len(through)
        ):
            raise _err(path, line, "chat template output is not prefix-stable; cannot locate model turn")
        turn = through[len(before) :]  # "{content}<end_of_turn>\n"
        end = turn.rfind(END_OF_TURN)
        cut = len(turn) if end < 0 else end + len(END_OF_TURN)
        pieces.append((full[cursor : len(before)], False))
        pieces.append((turn[:cut], True))
        cursor = len(before) + cut
    if cursor < len(full):
        pieces.append((full[cursor:], False))
    if any(r.handler.fixed_expansion is None for r in media):
        pieces = _expand_per_item(pieces, media, path, line)
    doc = _encode_pieces(tokenizer, pieces, eos_trained=False)
    if media:
        placeholders = tokenizer.media_token_ids
        n = sum(1 for i in doc.ids if i in placeholders)
        want = sum(tokenizer.placeholders_per_item(r.handler, r.source) for r in media)
        if n != want:
            raise _err(path, line, f"{n} media placeholder tokens for {len(media)} media item(s) "
                                   f"(expected {want}): a text part holds a media marker")
        doc.media = media
        doc.loss_mask = [m and i not in placeholders for i, m in zip(doc.ids, doc.mask())]  # never a target
    return doc


def _text(obj: dict, path: PathLike, line: int, tokenizer: Tokenizer) -> Document:
    text = _str_field(obj, "text", path, line)
    if not text:
        raise _err(path, line, '"text" is empty')
    return Document(list(tokenizer.encode(text, add_bos=True)) + [tokenizer.eos_id])


def jsonl_objects(path: PathLike, what: str = "data") -> Iterator[tuple[int, dict]]:
    """``(line, object)`` for every non-blank line of a JSONL file (a UTF-8 BOM allowed). An unreadable
    file, a line that is not UTF-8, not JSON or not a JSON object raises one ``DataError`` naming
    ``file:line``; ``what`` names the data in the message for a directory given as the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _err(path, None, "no such file or directory") from None
    except IsADirectoryError:
        raise _err(path, None, f"a directory ({what} is a .jsonl file)") from None
    except OSError as e:
        raise _err(path, None, f"cannot read: {e.strerror or e}") from None
    with f:
        for line, raw in enumerate(f, 1):
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _err(path, line, f"not valid UTF-8 (byte {raw[e.start]:#04x})") from None
            if line == 1:
                s = s.removeprefix("\ufeff")
            if not s.strip():
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise _err(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _err(path, line, f"expected a JSON object, got {_type_name(obj)}")
            yield line, obj


def read_jsonl(path: PathLike, tokenizer: Tokenizer) -> Iterator[Document]:
    """Stream the documents of one ``.jsonl`` file (blank lines skipped)."""
    n = 0
    for line, obj in jsonl_objects(path):
        formats = [
            name
            for name, present in (
                ("messages", "messages" in obj),
                ("prompt/completion", "prompt" in obj or "completion" in obj),
                ("text", "text" in obj),
            )
            if present
        ]
        if not formats:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise _err(
                path,
                line,
                f'expected "text", "prompt"+"completion" or "messages"; got keys {keys}',
            )
        if len(formats) > 1:
            raise _err(path, line, f"ambiguous line: has fields of several formats ({', '.join(formats)})")
        if formats[0] == "messages":
            doc = _chat(obj, path, line, tokenizer)
        elif formats[0] == "text":
            doc = _text(obj, path, line, tokenizer)
        else:
            doc = _prompt_completion(obj, path, line, tokenizer)
        n += 1
        yield doc
    if n == 0:
        raise _err(path, 1, "empty file (no JSON lines)")


# --------------------------------------------------------------------------- dispatch


def _expand(path: PathLike) -> list[tuple[Path, str]]:
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*.txt") if q.is_file())
        if not files:
            raise _err(path, None, "directory has no *.txt files")
        return [(q, "txt") for q in files]
    if not p.exists():
        raise _err(path, None, "no such file or directory")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return [(p, "txt")]
    if suffix == ".jsonl":
        return [(p, "jsonl")]
    raise _err(path, None, f"unsupported file type {p.suffix or '(none)'!r} (expected .txt, .jsonl or a directory)")


def _as_list(path_or_paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        return [path_or_paths]
    return list(path_or_paths)


def iter_documents(path_or_paths: PathLike | Sequence[PathLike], tokenizer: Tokenizer) -> Iterator[Document]:
    """Stream documents from files/directories in the given order (see module doc)."""
    paths = _as_list(path_or_paths)
    if not paths:
        raise DataError("no data paths given")
    for path in paths:
        for f, kind in _expand(path):
            if kind == "txt":
                yield read_text_file(f, tokenizer)
            else:
                yield from read_jsonl(f, tokenizer)


def load_documents(path_or_paths: PathLike | Sequence[PathLike], tokenizer: Tokenizer) -> list[Document]:
    """All documents from ``.txt`` files, directories of them, and ``.jsonl`` files."""
    return list(iter_documents(path_or_paths, tokenizer))


def train_val_split(
    docs: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic random split. ``round(val_fraction * n)`` documents go to validation
    (at least one when ``val_fraction > 0`` and there are two or more documents, and never
    all of them); both parts keep the input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    docs = list(docs)
    n = len(docs)
    n_val = min(max(round(val_fraction * n), 1), n - 1) if val_fraction > 0 and n >= 2 else 0
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val
