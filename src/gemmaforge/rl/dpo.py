"""Direct preference optimisation: the loss, preference files and pair packing.

    from gemmaforge.rl import dpo_loss
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)

``pc``/``pr``: the policy's summed log-probs of the chosen / rejected completions (one value per pair),
``rc``/``rr``: the reference's. With ``h = (pc - rc) - (pr - rr)``:

* ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``;
* ``"ipo"`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` on log-probs averaged over each completion's
  tokens (pass the means; the trainer's objective does, as TRL's ``loss_type="ipo"``).

The rewards are ``beta * (pc - rc)`` and ``beta * (pr - rr)`` (detached).

Preference files (``read_preferences``) are JSONL, one pair a line: ``{"prompt", "chosen", "rejected"}``
strings, or the chat form: ``prompt`` a list of messages, ``chosen`` / ``rejected`` an assistant message
(``{"role": "assistant", "content": ...}``, a one-message list, or a string), rendered with the tokenizer's
chat template. ``pack_pairs`` puts both sequences of a pair (prompt + chosen, prompt + rejected) in ONE
packed row as two documents (``cu_seqlens``: no attention between them), pairs never split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.packing import IGNORE_INDEX, PackedRow, collate_rows
from ..data.sources import END_OF_TURN, _type_name, jsonl_objects
from ..errors import DataError

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid"):
    """Per-pair DPO (or IPO) losses and the implicit rewards: ``(losses, chosen_rewards, rejected_rewards)``,
    each ``[P]``. Gradients flow through the policy's log-probs only (the reference's are detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    rc, rr = ref_chosen.detach(), ref_rejected.detach()
    h = (policy_chosen - rc) - (policy_rejected - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)).square()
    return losses, beta * (policy_chosen - rc).detach(), beta * (policy_rejected - rr).detach()


# ----------------------------------------------------------------------------- preference files

@dataclass
class PreferencePair:
    """Token ids of one pair; ``where`` names its ``file:line``."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str = ""

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)



def _assistant_text(v, key: str, where: str) -> str:
    """The content of a chat-form completion: a message, a one-message list, or a plain string."""
    if isinstance(v, list):
        if len(v) != 1:
            raise DataError(f'{where}: "{key}" must be one assistant message, got a list of {len(v)}')
        v = v[0]
    if isinstance(v, str):
        return v
    if not isinstance(v, dict) or "content" not in v:
        raise DataError(f'{where}: "{key}" must be an assistant message {{"role": "assistant", "content": ...}}, '
                        f"got {_type_name(v)}")
    if v.get("role", "assistant") not in ("assistant", "model"):
        raise DataError(f'{where}: "{key}" must be an assistant (model) message, got role {v.get("role")!r}')
    if not isinstance(v["content"], str):
        raise DataError(f'{where}: "{key}" content must be a string, got {_type_name(v["content"])}')
    return v["content"]


def _chat_pair(obj: dict, where: str, tokenizer) -> PreferencePair:
    from ..data.sources import _check_messages  # the one validation of a conversation

    msgs = obj["prompt"]
    try:
        checked = _check_messages({"messages": msgs + [{"role": "model", "content": "x"}]}, where.rsplit(":", 1)[0],
                                  int(where.rsplit(":", 1)[1]))
    except DataError as e:
        raise DataError(str(e).replace("messages[", "prompt[")) from None
    prompt_msgs = checked[:-1]
    if not prompt_msgs or prompt_msgs[-1]["role"] not in ("user",):
        raise DataError(f'{where}: "prompt" must end with a user message')
    before = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True)
    out = []
    for key in ("chosen", "rejected"):
        content = _assistant_text(obj[key], key, where)
        full = tokenizer.apply_chat_template(prompt_msgs + [{"role": "model", "content": content}],
                                             add_generation_prompt=False)
        if not full.startswith(before):
            raise DataError(f"{where}: chat template output is not prefix-stable; cannot locate the {key} turn")
        turn = full[len(before):]
        end = turn.rfind(END_OF_TURN)
        out.append(turn[: len(turn) if end < 0 else end + len(END_OF_TURN)])
    ids = list(tokenizer.encode(before, add_bos=True))
    return PreferencePair(ids, list(tokenizer.encode(out[0], add_bos=False)),
                          list(tokenizer.encode(out[1], add_bos=False)), where)


def read_preferences(path, tokenizer) -> list[PreferencePair]:
    """Every pair of one JSONL file, tokenized: a plain prompt with BOS, a completion without BOS and with
    EOS (the EOS is trained: ending is part of the answer); a chat completion ends with its
    ``<end_of_turn>``. Bad lines raise one ``DataError`` naming ``file:line`` and the key."""
    pairs = []
    for line, obj in jsonl_objects(path, "preference data"):
        where = f"{path}:{line}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
                raise DataError(f'{where}: preference pair lacks "{key}" (a line is {{"prompt", "chosen", '
                                f'"rejected"}}; got keys {keys})')
        if isinstance(obj["prompt"], list):
            pair = _chat_pair(obj, where, tokenizer)
        else:
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(obj[key], str):
                    raise DataError(f'{where}: "{key}" must be a string (or, in the chat form, "prompt" a list '
                                    f"of messages), got {_type_name(obj[key])}")
            if not obj["chosen"] or not obj["rejected"]:
                raise DataError(f'{where}: "{"chosen" if not obj["chosen"] else "rejected"}" is empty')
            pair = PreferencePair(list(tokenizer.encode(obj["prompt"], add_bos=True)),
                                  list(tokenizer.encode(obj["chosen"], add_bos=False)) + [tokenizer.eos_id],
                                  list(tokenizer.encode(obj["rejected"], add_bos=False)) + [tokenizer.eos_id],
                                  where)
        if pair.chosen == pair.rejected:
            raise DataError(f'{where}: "chosen" and "rejected" are identical (nothing to prefer)')
        if not pair.prompt:
            pair.prompt = [tokenizer.bos_id]
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}:1: empty file (no JSON lines)")
    return pairs


def load_preferences(paths, tokenizer) -> list[PreferencePair]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DataError("no preference data given (--data prefs.jsonl)")
    out = []
    for p in paths:
        out.extend(read_preferences(p, tokenizer))
    return out


# ----------------------------------------------------------------------------- packing

@dataclass
class PairRow(PackedRow):
    """A packed row of whole pairs. ``seq[t]``: the completion sequence position ``t`` predicts a token of
    (``2k`` chosen, ``2k + 1`` rejected of the row's pair ``k``), -1 elsewhere (prompts, padding)."""

    seq: torch.Tensor = field(default=None)
    num_pairs: int = 0
    pair_ids: tuple = ()  # the pairs' indices in the list given to ``pack_pairs``


def pack_pairs(pairs: list[PreferencePair], seq_len: int, pad_id: int = 0) -> list[PairRow]:
    """First-fit-decreasing packing of whole pairs into rows of exactly ``seq_len`` tokens: chosen and
    rejected of a pair are two documents of one row. A pair longer than ``seq_len`` raises ``DataError``
    naming its line."""
    for p in pairs:
        if p.num_tokens > seq_len:
            raise DataError(f"{p.where}: the pair is {p.num_tokens} tokens (prompt twice + chosen + rejected), more "
                            f"than a packed row (--seq-len {seq_len}); raise --seq-len")
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].num_tokens)
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = pairs[i].num_tokens
        for b, room in enumerate(free):
            if room >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    return [_pair_row([pairs[i] for i in sorted(b)], sorted(b), seq_len, pad_id) for b in bins]


def _pair_row(pairs: list[PreferencePair], ids_of: list[int], seq_len: int, pad_id: int) -> PairRow:
    ids: list[int] = []
    labels: list[int] = []
    seq: list[int] = []
    pos: list[int] = []
    cu = [0]
    for k, p in enumerate(pairs):
        for j, comp in enumerate((p.chosen, p.rejected)):
            doc = p.prompt + comp
            ids.extend(doc)
            pos.extend(range(len(doc)))
            # position t predicts doc[t + 1]: the completion's tokens are predicted from len(prompt) - 1 on
            labels.extend([IGNORE_INDEX] * (len(p.prompt) - 1) + comp + [IGNORE_INDEX])
            seq.extend([-1] * (len(p.prompt) - 1) + [2 * k + j] * len(comp) + [-1])
            cu.append(len(ids))
    real = len(ids)
    if real < seq_len:
        pad = seq_len - real
        ids.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        seq.extend([-1] * pad)
        pos.extend(range(pad))
        cu.append(seq_len)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PairRow(input_ids=t(ids), labels=t(labels), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                   position_ids=t(pos), num_real_tokens=real, doc_spans=(), seq=t(seq), num_pairs=len(pairs),
                   pair_ids=tuple(ids_of))


def collate_pairs(rows: list[PairRow]) -> dict:
    """``collate_rows`` plus ``seq`` renumbered over the micro-batch (row ``b``'s pair ``k`` is pair
    ``offset_b + k``) and ``num_pairs``."""
    batch = collate_rows(rows)
    seqs, off = [], 0
    for r in rows:
        seqs.append(torch.where(r.seq >= 0, r.seq + 2 * off, r.seq))
        off += r.num_pairs
    batch["seq"] = torch.stack(seqs)
    batch["num_pairs"] = off
    return batch
