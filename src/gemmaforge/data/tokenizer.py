"""Gemma tokenizer: a thin wrapper over a HF ``tokenizers`` tokenizer, plus the Gemma chat format.

    tok = Tokenizer.from_file("path/to/model_dir")        # tokenizer.json (or a .gguf file)
    ids = tok.encode("Hello")                              # [bos, ...]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    # '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'   (no BOS: encode adds it)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers

from ..errors import CheckpointError, InputError

__all__ = ["Tokenizer", "GEMMA_CHAT_TEMPLATE"]

# The same format as ``Tokenizer.apply_chat_template``, as a Jinja template for transformers
# (written into tokenizer_config.json by ``save``). Unlike the Python method it starts with BOS,
# as HF chat templates do.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _token_str(v) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """Encode/decode text for a Gemma model.

    ``backend`` is the underlying ``tokenizers.Tokenizer``; ``bos_token`` / ``eos_token`` /
    ``pad_token`` / ``unk_token`` name the special tokens (found in the vocabulary by their usual
    Gemma / sentencepiece spellings when not given).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        where: str = "tokenizer",
    ):
        self.backend = backend
        self.where = where
        if bos_token is None:
            bos_token = self._template_bos(backend) or self._first_present("<bos>", "<s>")
        if unk_token is None:
            unk_token = getattr(backend.model, "unk_token", None) or self._first_present("<unk>")
        if eos_token is None:
            eos_token = self._first_present("<eos>", "</s>", "<|endoftext|>")
        if pad_token is None:
            pad_token = self._first_present("<pad>")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        if self.bos_id is None:
            raise CheckpointError(f"{where}: no BOS token (looked for {bos_token or '<bos>'!r}) in the vocabulary")
        if self.eos_id is None:
            raise CheckpointError(f"{where}: no EOS token (looked for {eos_token or '<eos>'!r}) in the vocabulary")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a ``tokenizer.json`` file or a directory holding one (with an optional
        ``tokenizer_config.json`` naming the special tokens); a ``.gguf`` file's tokenizer:
        ``gemmaforge.formats.gguf.gguf_tokenizer``."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise CheckpointError(f"{p}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        kwargs = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
                tok = _token_str(cfg.get(name))
                if tok is not None and backend.token_to_id(tok) is not None:
                    kwargs[name] = tok
        return cls(backend, where=str(file), **kwargs)

    @classmethod
    def from_json(cls, spec: str | dict, **special_tokens) -> "Tokenizer":
        """From a HF ``tokenizers`` JSON document (a string or an already-parsed dict)."""
        if isinstance(spec, dict):
            spec = json.dumps(spec, ensure_ascii=False)
        try:
            backend = tokenizers.Tokenizer.from_str(spec)
        except Exception as e:
            raise CheckpointError(f"tokenizer JSON: cannot load ({str(e).splitlines()[0]})") from None
        return cls(backend, **special_tokens)

    def _first_present(self, *candidates: str) -> str | None:
        for c in candidates:
            if self.backend.token_to_id(c) is not None:
                return c
        return None

    @staticmethod
    def _template_bos(backend: tokenizers.Tokenizer) -> str | None:
        """The special token the post-processor puts first (the BOS that ``encode`` adds)."""
        proc = backend.post_processor
        if proc is None:
            return None
        try:
            pp = json.loads(proc.__getstate__())
        except Exception:
            return None
        if pp.get("type") == "TemplateProcessing" and pp.get("single"):
            first = pp["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
        return None

    # -- ids ------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: EOS, and ``<end_of_turn>`` when the vocabulary has it."""
        ids = [self.eos_id]
        eot = self.backend.token_to_id("<end_of_turn>")
        if eot is not None and eot not in ids:
            ids.append(eot)
        return ids

    def __len__(self) -> int:
        return self.vocab_size

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, BOS first when ``add_bos`` (as transformers' ``encode`` does)."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (parallel inside the tokenizers library)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        bos = [self.bos_id] if add_bos else []
        return [bos + e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (size {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """Gemma's chat format (BOS not included; ``encode`` adds it).

        A leading ``system`` message is folded into the first user turn (its text, then a blank
        line); turns must alternate user / assistant (``assistant`` is written as ``model``);
        contents are stripped of surrounding whitespace. A content may also be a list of parts
        ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` / ``{"type": "audio"}``.
        """
        messages = list(messages)
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"chat message {k}: expected a dict with 'role' and 'content'")
        prefix = ""
        turns = messages
        if messages and messages[0]["role"] == "system":
            sys_content = messages[0]["content"]
            if isinstance(sys_content, str):
                prefix = sys_content + "\n\n"
            else:
                prefix = self._part_text(sys_content, 0, first_only=True) + "\n\n"
            turns = messages[1:]
        out = []
        for k, m in enumerate(turns):
            role = m["role"]
            if (role == "user") != (k % 2 == 0):
                raise InputError("Conversation roles must alternate user/assistant/user/assistant/...")
            if role == "assistant":
                role = "model"
            out.append(f"<start_of_turn>{role}\n")
            if k == 0:
                out.append(prefix)
            content = m["content"]
            if isinstance(content, str):
                out.append(content.strip())
            else:
                out.append(self._part_text(content, k))
            out.append("<end_of_turn>\n")
        if add_generation_prompt:
            out.append("<start_of_turn>model\n")
        return "".join(out)

    @staticmethod
    def _part_text(parts, k: int, first_only: bool = False) -> str:
        if not isinstance(parts, (list, tuple)):
            raise InputError(f"chat message {k}: content must be a string or a list of parts")
        if first_only:
            if not parts or not isinstance(parts[0], dict) or "text" not in parts[0]:
                raise InputError("system message: content list must start with a text part")
            return parts[0]["text"]
        pieces = []
        for p in parts:
            if not isinstance(p, dict):
                raise InputError(f"chat message {k}: content parts must be dicts")
            if p.get("type") == "image":
                pieces.append("<start_of_image>")
            elif p.get("type") == "audio":  # a marker the processor expands (Gemma 4: <|audio> ... <audio|>)
                pieces.append("<start_of_audio>")
            elif p.get("type") == "text":
                pieces.append(str(p.get("text", "")).strip())
        return "".join(pieces)

    # -- saving ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers'
        ``AutoTokenizer.from_pretrained(directory)`` loads (with the Gemma chat template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        add_bos = self._template_bos(self.backend) is not None
        cfg = {
            "tokenizer_class": "GemmaTokenizer",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",
            "chat_template": GEMMA_CHAT_TEMPLATE,
        }
        if self.backend.token_to_id("<mask>") is not None:
            cfg["mask_token"] = "<mask>"
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return d

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
