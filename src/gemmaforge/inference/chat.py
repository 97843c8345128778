"""Chat with a Gemma model: a conversation rendered in Gemma's chat format, the reply generated on the
KV-cache path of ``generate_ids`` and streamed as text.

    reply = chat(model, tok, [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi!"}], on_text=print_piece)

    conv = Conversation(model, tok, system="Be brief.")      # keeps the history between turns
    conv.send("Hi!", on_text=print_piece); conv.send("And again?"); conv.reset()

Each reply stops at ``<end_of_turn>`` (or EOS: ``stop_ids_of``); its text has no special tokens.
Every turn renders and prefills the whole conversation again (a fresh cache per turn).
"""

from __future__ import annotations

from typing import Sequence

from ..errors import InputError
from .generate import _generate_text, prompt_with_media

__all__ = ["chat", "chat_prompt_ids", "Conversation"]


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The token ids the model reads before its reply: BOS, the conversation in Gemma's chat format,
    then ``<start_of_turn>model\\n``. The conversation must end with a user message."""
    messages = list(messages)
    check_conversation(messages)
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def check_conversation(messages: list) -> None:
    """One line for a conversation the model cannot reply to (no user message last, an empty one)."""
    turns = messages[1:] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" \
        else messages
    if not turns:
        raise InputError("chat: no user message to reply to")
    last = turns[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        role = last.get("role") if isinstance(last, dict) else type(last).__name__
        raise InputError(f"chat: the last message must be the user's (got {role!r})")
    content = last.get("content")
    if isinstance(content, str) and not content.strip():
        raise InputError("chat: empty user message")


def chat(model, tokenizer, messages: Sequence[dict], max_new_tokens: int = 256, temperature: float = 0.0,
         top_k: int | None = None, top_p: float | None = None, seed: int | None = None, on_text=None,
         on_token=None, return_stats: bool = False, images=None):
    """The model's reply to ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``,
    roles alternating user / assistant after an optional system message, the last one the user's).

    ``on_text(piece)`` gets the reply's text as it is generated, in whole characters (the pieces
    joined are the returned reply); ``on_token(id)`` each generated id. Sampling as in ``generate``
    (temperature 0 is greedy). ``return_stats=True`` returns ``(reply, GenerationStats)``.

    Media: a message's content may be a list of parts (``{"type": "text", "text": ...}``,
    ``{"type": "image", "path": ...}``); ``images`` fill image parts without a path, in order (with
    ``tokenizer`` the model's processor, ``gemmaforge.load_processor``)."""
    media = None
    if images or _has_media(messages):  # the processor expands each item's markers (their counts may vary)
        check_conversation(list(messages))
        ids, media = prompt_with_media(model, tokenizer, messages=list(messages), images=images)
    else:
        ids = chat_prompt_ids(tokenizer, messages)
    return _generate_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, on_token,
                          on_text, return_stats, media)


def _has_media(messages) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
               and any(isinstance(p, dict) and p.get("type") not in (None, "text") for p in m["content"])
               for m in messages)


class Conversation:
    """A multi-turn chat that keeps its history: ``send(text)`` adds the user's message, generates the
    reply, adds it and returns it; ``reset()`` forgets every turn (keeps the system prompt).

    With a ``seed`` (and a temperature > 0) turn ``k`` (from 0) samples with seed ``seed + k``:
    a conversation replays exactly."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, images=None):
        self.model, self.tokenizer = model, tokenizer
        self.images = list(images or [])  # shown with the first user message (paths or PIL images)
        self.system = system
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.turns: list[dict] = []
        self.stats = None  # the last reply's GenerationStats

    @property
    def messages(self) -> list[dict]:
        """The conversation so far, the system message first (when there is one)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def _content(self, text: str, first: bool):
        if not (first and self.images):
            return text
        return [{"type": "image", "image": im} if not isinstance(im, (str, bytes)) and not hasattr(im, "__fspath__")
                else {"type": "image", "path": str(im)} for im in self.images] + [{"type": "text", "text": text}]

    def reset(self) -> None:
        self.turns = []

    def send(self, text: str, on_text=None, on_token=None) -> str:
        """Reply to ``text``. If generation fails or is interrupted, the history is as it was before."""
        if not isinstance(text, str):
            raise InputError(f"chat message must be a str, got {type(text).__name__}")
        k = len(self.turns) // 2
        seed = None if self.seed is None else self.seed + k
        messages = self.messages + [{"role": "user", "content": self._content(text, first=not self.turns)}]
        reply, self.stats = chat(self.model, self.tokenizer, messages, seed=seed, on_text=on_text,
                                 on_token=on_token, return_stats=True, **self.sampling)
        self.turns += [{"role": "user", "content": self._content(text, first=not self.turns)},
                       {"role": "assistant", "content": reply}]
        return reply
