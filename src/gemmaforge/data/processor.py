"""The multimodal processor: a tokenizer plus one handler per modality, as transformers' processors.

    proc = gemmaforge.load_processor("path/to/gemma-3-4b-it")
    batch = proc(messages=[{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                                        {"type": "text", "text": "What is this?"}]}])
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"])

The chat renderer writes one marker per media part (Gemma 3: ``<start_of_image>``); the processor
replaces each marker by its item's expansion (Gemma 3: ``\\n\\n<start_of_image>`` + the image soft
token ``mm_tokens_per_image`` times + ``<end_of_image>\\n\\n``) and tokenizes the text split at the
media special tokens (as a tokenizer splits at added tokens). ``token_types`` is 0 for text and the
handler's type at its placeholder tokens (Gemma 3 image: 1; the reference's ``token_type_ids``).

A handler (one per modality; Gemma 4 adds its image and audio handlers) provides:

- ``modality`` / ``part_type`` (the ``{"type": ...}`` of message parts) / ``marker`` (what the chat
  renderer writes for a part) / ``special`` (``{token string: id}`` the tokenization splits at) /
  ``token_id`` (the placeholder the features replace) / ``token_type``;
- ``__call__(items, **options) -> (model inputs dict, [expansion text per item])`` (``items``:
  paths or in-memory objects);
- ``fixed_expansion`` (the expansion that needs no look at the item, used when encoding training
  text; None if the count depends on the item) and ``check(path)`` (a cheap readability check).

The processor also acts as the tokenizer for training data (``encode`` expands markers with the
fixed expansion): ``load_documents(path, processor)`` reads image parts, their paths relative to the
JSONL file, into ``Document.media`` (``MediaRef`` s), which ``media_inputs`` turns into the model's
inputs when a batch is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from .images import Gemma3ImageProcessor, check_image

IMAGE_TYPE = 1  # the reference's token type of image tokens (models.common.media.IMAGE)


@dataclass(frozen=True)
class MediaRef:
    """One media item of a training document: its handler and its source (a path)."""

    handler: object
    source: object

    @property
    def modality(self) -> str:
        return self.handler.modality


def media_inputs(refs: Sequence[MediaRef]) -> dict[str, torch.Tensor]:
    """The model inputs of ``refs`` (in order; grouped by handler, each handler's tensors concatenated)."""
    out: dict[str, list] = {}
    groups: dict[int, tuple[object, list]] = {}
    for r in refs:
        groups.setdefault(id(r.handler), (r.handler, []))[1].append(r.source)
    for handler, items in groups.values():
        inputs, _ = handler(items, do_pan_and_scan=False)
        for k, v in inputs.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


class Gemma3ImageHandler:
    modality = "image"
    part_type = "image"
    token_type = IMAGE_TYPE

    def __init__(self, image_processor: Gemma3ImageProcessor, *, image_seq_length: int, boi_id: int, eoi_id: int,
                 image_id: int, boi: str = "<start_of_image>", eoi: str = "<end_of_image>",
                 image_token: str = "<image_soft_token>"):
        self.image_processor = image_processor
        self.image_seq_length = image_seq_length
        self.marker = boi
        self.token_id = image_id
        self.special = {boi: boi_id, eoi: eoi_id, image_token: image_id}
        self.full_sequence = f"\n\n{boi}{image_token * image_seq_length}{eoi}\n\n"

    @property
    def fixed_expansion(self) -> str:
        return self.full_sequence

    def expansion(self, n_crops: int) -> str:
        if not n_crops:
            return self.full_sequence
        return (f"Here is the original image {self.full_sequence} and here are some crops to help you see better "
                + " ".join([self.full_sequence] * n_crops))

    def check(self, path) -> None:
        check_image(path)

    def save(self, directory) -> None:
        """``preprocessor_config.json`` and ``processor_config.json`` as transformers reads them."""
        import json

        d = Path(directory)
        (d / "preprocessor_config.json").write_text(
            json.dumps(self.image_processor.cfg.to_hf(self.image_seq_length), indent=2) + "\n")
        (d / "processor_config.json").write_text(
            json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": self.image_seq_length}, indent=2)
            + "\n")

    def __call__(self, items, do_pan_and_scan: bool | None = None, **_):
        pixel_values, crops = self.image_processor(items, do_pan_and_scan=do_pan_and_scan)
        return {"pixel_values": pixel_values}, [self.expansion(n) for n in crops]


class Processor:
    """Tokenizer + media handlers. Also usable wherever a tokenizer is (``encode``, ``apply_chat_template``,
    ``bos_id``...): markers in encoded text are expanded to their placeholder tokens."""

    def __init__(self, tokenizer, handlers: Sequence = ()):
        self.tokenizer = tokenizer
        self.handlers = list(handlers)
        specials = {s: i for h in self.handlers for s, i in h.special.items()}
        self._specials = specials
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") \
            if specials else None

    # ---- the tokenizer's interface ----
    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self):
        return self.tokenizer.pad_id

    @property
    def stop_ids(self) -> list[int]:
        return self.tokenizer.stop_ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def save(self, directory):
        """The tokenizer's files and each handler's preprocessing config."""
        out = self.tokenizer.save(directory)
        for h in self.handlers:
            h.save(directory)
        return out

    def handler_for(self, part_type: str):
        for h in self.handlers:
            if h.part_type == part_type:
                return h
        return None

    def placeholders_per_item(self, handler, source=None) -> int:
        """Placeholder tokens one item of ``handler`` gets in training text (its fixed expansion, or, for a
        handler whose count depends on the item (Gemma 4), ``handler.expansion_of(source)``)."""
        text = handler.fixed_expansion if handler.fixed_expansion is not None else handler.expansion_of(source)
        return self.tokenize(text, add_bos=False).count(handler.token_id)

    @property
    def media_token_ids(self) -> set[int]:
        return {h.token_id for h in self.handlers}

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of already-expanded text: split at the media special tokens, the pieces encoded."""
        if self._split is None:
            return self.tokenizer.encode(text, add_bos=add_bos)
        ids = [self.tokenizer.bos_id] if add_bos else []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self._specials:
                ids.append(self._specials[piece])
            else:
                ids.extend(self.tokenizer.encode(piece, add_bos=False))
        return ids

    def expand(self, text: str, expansions: dict[str, list[str]] | None = None) -> str:
        """``text`` with every handler marker replaced, in order, by the given expansions (default: the
        handler's fixed expansion). A marker count that differs from the expansions given is an error."""
        for h in self.handlers:
            pieces = text.split(h.marker)
            n = len(pieces) - 1
            exp = (expansions or {}).get(h.modality)
            if exp is None:
                if n and h.fixed_expansion is None:
                    raise InputError(f"{h.marker}: the {h.modality} placeholder count depends on the {h.modality}")
                exp = [h.fixed_expansion] * n
            if len(exp) != n:
                raise InputError(f"{n} {h.modality} placeholder(s) ({h.marker}) in the prompt but {len(exp)} "
                                 f"{h.modality}(s) given")
            out = [pieces[0]]
            for e, p in zip(exp, pieces[1:]):
                out += [e, p]
            text = "".join(out)
        return text

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenize(self.expand(text), add_bos=add_bos)

    # ---- the processor ----
    def media_of(self, messages, base_dir=None) -> dict[str, list]:
        """Sources of every media part of ``messages``, by modality, in order (paths made relative to
        ``base_dir``; a part without ``path``/``image``/``audio`` gives None, filled from ``images=``)."""
        out: dict[str, list] = {}
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, (list, tuple)):
                continue
            for part in content:
                if not isinstance(part, dict) or part.get("type") in (None, "text"):
                    continue
                t = part["type"]
                h = self.handler_for(t)
                if h is None:
                    raise InputError(f"a {t!r} part given to a model without a {t} tower")
                src = part.get("path", part.get(t))
                if src is None and part.get("url") is not None:
                    raise InputError(f"{t} part with a url: gemmaforge reads local files only (give 'path')")
                if isinstance(src, (str, Path)) and base_dir is not None and not Path(src).is_absolute():
                    src = Path(base_dir) / src
                out.setdefault(h.modality, []).append(src)
        return out

    def __call__(self, messages=None, text=None, images=None, audio=None, add_generation_prompt: bool = True,
                 do_pan_and_scan: bool | None = None, base_dir=None) -> dict:
        """``input_ids`` ``[B, S]``, ``attention_mask``, ``token_types`` (also as ``token_type_ids``) and
        each modality's inputs (``pixel_values`` ...), for one conversation (``messages``: a list of
        messages), several (a list of such lists: rows padded on the left) or ``text`` (a string or
        a list, with markers, and ``images`` / ``audio`` in order)."""
        if (messages is None) == (text is None):
            raise InputError("processor: give messages or text (one of them)")
        given = {"image": images, "audio": audio}
        if messages is not None:
            convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            texts = [self.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
            sources = [self.media_of(c, base_dir) for c in convs]
        else:
            texts = [text] if isinstance(text, str) else list(text)
            sources = [{h.modality: [None] * tx.count(h.marker) for h in self.handlers} for tx in texts]
        # fill parts without a source from images= / audio= in order
        for modality, items in given.items():
            if items is None:
                continue
            items = list(items) if isinstance(items, (list, tuple)) else [items]
            slots = [(src, i) for src in sources for i, s in enumerate(src.get(modality, [])) if s is None]
            if len(slots) != len(items):
                raise InputError(f"{len(slots)} {modality} placeholder(s) in the prompt but {len(items)} "
                                 f"{modality}(s) given")
            for (src, i), item in zip(slots, items):
                src[modality][i] = item
        rows, inputs = [], {}
        for tx, src in zip(texts, sources):
            expansions = {}
            for h in self.handlers:
                items = src.get(h.modality, [])
                missing = sum(1 for s in items if s is None)
                if missing:
                    raise InputError(f"{len(items)} {h.modality} placeholder(s) in the prompt but "
                                     f"{len(items) - missing} {h.modality}(s) given")
                if not items:
                    continue
                got, expansions[h.modality] = h(items, do_pan_and_scan=do_pan_and_scan)
                for k, v in got.items():
                    inputs.setdefault(k, []).append(v)
            rows.append(self.tokenize(self.expand(tx, expansions), add_bos=True))
        S = max(len(r) for r in rows)
        pad = self.pad_id if self.pad_id is not None else 0
        ids = torch.full((len(rows), S), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding, as Gemma's tokenizer pads
            ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, S - len(r):] = 1
        types = torch.zeros_like(ids)
        for h in self.handlers:
            types[ids == h.token_id] = h.token_type
        types[mask == 0] = 0
        out = {"input_ids": ids, "attention_mask": mask, "token_types": types, "token_type_ids": types}
        out.update({k: torch.cat(v) for k, v in inputs.items()})
        return out
