"""Per-token log-probs of packed rows (for RL / evaluation) and policy-gradient losses.

    import gemmaforge
    from gemmaforge.rl.score import score, pack_rollouts, policy_loss, grpo_advantages

    out = score(model, ids, cu_seqlens=cu, return_entropy=True)   # ScoreOutput
    out.logprobs[t]   # log p(ids[t+1] | the document's tokens up to t), fp32, differentiable
    out.entropy[t]    # entropy of that next-token distribution
    out.valid[t]      # False at every document's last token (nothing to predict there)

Convention (the same as the pre-shifted ``labels`` of :mod:`gemmaforge.data.packing`): position
``t`` holds the prediction of token ``t + 1`` *made at* ``t``. At a document's last token there
is no next token of that document: ``valid`` is False there and ``logprobs`` / ``entropy`` are 0
(with no gradient). With ``labels=`` (packing's labels: ``labels[t]`` = the target of position
``t``, ``-100`` = ignore) the targets are the labels and ``valid = labels != -100``; only the
valid positions go through the LM head, so prompt tokens and padding cost nothing there. A
mask for "completion tokens only" is therefore just ``labels != -100`` of rows packed from
documents whose ``loss_mask`` is False on the prompt (see :func:`pack_rollouts`).

The LM head runs in chunks of ``chunk_size`` positions (``model.lm_head.logprobs``, :func:`gemmaforge.ops.head_loss.chunked_logprobs`):
the ``[T, vocab]`` logits never exist, in the forward or the backward pass. Final logit
soft-capping (the head's ``softcap``) is applied before ``/ temperature``, as the
model's own logits and HF sampling do.

Parallel layouts (``gemmaforge.parallel.parallelize.parallelize``): ``score`` works unchanged on an
FSDP2- and/or TP-sharded model (tests/test_distributed.py checks both against one process, values
and gradients). Under FSDP2 each data-parallel rank scores its OWN rows and the gradients are
SUMMED over those ranks (``parallelize`` sets FSDP's divide factor to 1), so a policy loss should
be divided by the global count of valid tokens (``policy_loss(..., num_tokens=global_count)``,
the count all-reduced over the data-parallel group); under TP every rank of a TP group passes the
same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import InputError
from ..layers.attention import check_cu_seqlens

__all__ = [
    "ScoreOutput",
    "score",
    "RolloutBatch",
    "pack_rollouts",
    "token_document_ids",
    "policy_loss",
    "grpo_advantages",
]

IGNORE_INDEX = -100
DEFAULT_CHUNK = 512  # positions per LM-head chunk: 512 x 262144 fp32 = 512 MiB per work buffer


@dataclass
class ScoreOutput:
    """Outputs of :func:`score`, each shaped like ``input_ids``.

    ``logprobs`` (fp32): ``log p(target[t] | tokens of t's document up to t)``, 0 where not ``valid``.
    ``entropy`` (fp32 or None): entropy of the same next-token distribution, 0 where not ``valid``.
    ``valid`` (bool): positions that predict something (not a document's last token; with
    ``labels``: ``labels != -100``).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    valid: torch.Tensor


def _next_token_targets(ids_flat: torch.Tensor, cu: torch.Tensor | None, row_len: int):
    """Targets ``ids[t+1]`` and the validity mask for the flattened row(s)."""
    n = ids_flat.numel()
    targets = torch.zeros_like(ids_flat)
    if n > 1:
        targets[:-1] = ids_flat[1:]
    valid = torch.ones(n, dtype=torch.bool, device=ids_flat.device)
    if cu is not None:
        ends = cu[1:].long() - 1  # last token of every segment (empty segments: a previous end or -1)
        ends = ends[ends >= 0]
        valid[ends] = False
    else:  # every row of length row_len is one document
        valid[row_len - 1 :: row_len] = False
    if n:
        valid[-1] = False
    return targets, valid


def score(
    model,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    position_ids: torch.Tensor | None = None,
    attn_backend: str | None = None,
) -> ScoreOutput:
    """Per-token log-probs (and optionally entropies) of each next token of packed rows.

    Args:
        model: a gemmaforge ``CausalLM`` (LoRA-wrapped or not).
        input_ids: ``[T]`` (one packed row) or ``[B, T]`` (``cu_seqlens`` then describes the
            flattened ``[B*T]`` view, as :func:`gemmaforge.data.packing.collate_rows` builds it;
            without ``cu_seqlens`` every row is one document).
        cu_seqlens: document boundaries ``[0, l1, l1+l2, ..., T]``; None = one document per row.
        labels: optional pre-shifted targets shaped like ``input_ids`` (``-100`` = not scored);
            by default the targets are the next tokens of each document.
        temperature: the distribution is ``softmax(softcap(logits) / temperature)``.
        return_entropy: also return the entropy of that distribution at every valid position.
        chunk_size: positions per LM-head chunk (peak extra memory ~ 1-2 x chunk x vocab x 4 B).

    Returns:
        :class:`ScoreOutput`; ``logprobs`` / ``entropy`` are differentiable wrt the model's
        parameters when grad mode is on (policy-gradient training).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise InputError("input_ids must be a [T] or [B, T] integer tensor")
    temperature = float(temperature)
    if not temperature > 0:
        raise InputError(f"temperature must be positive, got {temperature}")
    shape = input_ids.shape
    ids_flat = input_ids.reshape(-1)
    n = ids_flat.numel()
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, n)
        cu = cu_seqlens.to(ids_flat.device)
    else:
        cu = None
    if labels is not None:
        if labels.shape != shape:
            raise InputError(f"labels must have the shape of input_ids {tuple(shape)}; got {tuple(labels.shape)}")
        y = labels.reshape(-1).to(ids_flat.device).long()
        valid = y != IGNORE_INDEX
        targets = torch.where(valid, y, torch.zeros_like(y))
    else:
        targets, valid = _next_token_targets(ids_flat, cu, shape[-1])

    hidden = model(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids, attn_backend=attn_backend,
                   return_hidden=True)
    hidden = hidden.reshape(n, hidden.shape[-1])
    idx = valid.nonzero().squeeze(1)
    out = model.lm_head.logprobs(hidden.index_select(0, idx), targets.index_select(0, idx), temperature=temperature,
                                 chunk_size=chunk_size, return_entropy=return_entropy)
    lp, ent = out if return_entropy else (out, None)

    def scatter(v):
        return torch.zeros(n, dtype=torch.float32, device=ids_flat.device).index_copy(0, idx, v).view(shape)

    return ScoreOutput(scatter(lp), scatter(ent) if ent is not None else None, valid.view(shape))


# --------------------------------------------------------------------------- rollouts -> rows


@dataclass
class RolloutBatch:
    """Prompt+completion pairs concatenated into one packed row (no padding).

    ``labels[t]`` is the completion token predicted at ``t`` (``-100`` on prompts), so
    ``score(model, b.input_ids, b.cu_seqlens, labels=b.labels)`` scores completion tokens only.
    ``spans[k] = (item, start, prompt_len, completion_len)``; item ``k``'s completion log-probs
    are ``logprobs[start + prompt_len - 1 : start + prompt_len - 1 + completion_len]``
    (see :meth:`completion_slice`).
    """

    input_ids: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    labels: torch.Tensor  # int64 [T]
    spans: list = field(default_factory=list)

    @staticmethod
    def completion_slice(span) -> slice:
        _, start, p, c = span
        return slice(start + p - 1, start + p - 1 + c)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack_rollouts(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], max_tokens: int) -> Iterator[RolloutBatch]:
    """Greedy, in-order packing of ``(prompt_ids, completion_ids)`` pairs into rows of at most
    ``max_tokens`` tokens (a longer pair gets a row of its own; pairs are never split, since a
    completion needs its whole prompt). Item indices count from 0 in input order."""
    if max_tokens < 1:
        raise InputError(f"max_tokens must be positive, got {max_tokens}")
    ids: list[int] = []
    labels: list[int] = []
    cu = [0]
    spans: list = []

    def flush():
        return RolloutBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(cu, dtype=torch.int32),
                            torch.tensor(labels, dtype=torch.long), list(spans))

    for k, (p, c) in enumerate(pairs):
        p, c = list(p), list(c)
        if not p:
            raise InputError(f"rollout {k}: empty prompt (the first completion token needs a context)")
        n = len(p) + len(c)
        if spans and len(ids) + n > max_tokens:
            yield flush()
            ids, labels, cu, spans = [], [], [0], []
        spans.append((k, len(ids), len(p), len(c)))
        ids.extend(p)
        ids.extend(c)
        labels.extend([IGNORE_INDEX] * (len(p) - 1))
        labels.extend(c)
        labels.append(IGNORE_INDEX)
        cu.append(len(ids))
    if spans:
        yield flush()


def token_document_ids(cu_seqlens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Document index of every position of a packed row: ``per_doc_values[token_document_ids(cu)]``
    broadcasts per-sequence values (e.g. GRPO advantages) to tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1]) if num_tokens is None else num_tokens
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                   output_size=total)


# --------------------------------------------------------------------------- policy losses

_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps ratios finite when policies have drifted far apart


def _kl(logprobs, ref_logprobs, estimator: str):
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1 / k2 / k3)."""
    d = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # log(ref / pi)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.expm1(d) - d  # k3: (r - 1) - log r >= 0, unbiased, low variance


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Token-level PPO / GRPO clipped surrogate, averaged over the valid tokens.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))``
    (``clip_eps_high`` defaults to ``clip_eps``; a larger one is DAPO's "clip-higher").
    With ``kl_coef > 0`` adds ``kl_coef * KL(pi || ref)`` estimated per token from
    ``ref_logprobs`` (``kl_estimator``: ``"k3"`` (default, GRPO), ``"k1"``, or ``"k2"``).

    Args:
        logprobs: current policy log-probs of the sampled tokens (differentiable), e.g. ``score(...).logprobs``.
        old_logprobs: the sampling policy's log-probs (no gradient is taken through them).
        advantages: per token, or anything broadcastable to ``logprobs`` (e.g. ``[B, 1]``).
        mask: True (or 1) on tokens that count: completion tokens, i.e. prompts, padding and
            document ends excluded (``labels != -100`` / ``ScoreOutput.valid``).
        num_tokens: denominator of the mean (default: the number of masked tokens here; pass the
            global count when accumulating gradients over micro-batches).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of floats over masked tokens: ``pg_loss``,
        ``kl`` (0 without a reference), ``clip_frac`` (tokens whose clipped term is active),
        ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio_mean``, ``ratio_max``, ``tokens``.
        Positions outside the mask never produce nan/inf, whatever they hold.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError("clip_eps / clip_eps_high must be non-negative")
    eps_hi = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.to(torch.bool) if mask.dtype == torch.bool else mask != 0
    m = m.expand_as(logprobs)
    mf = m.to(logprobs.dtype)
    count = m.sum()
    denom = count.clamp(min=1).to(logprobs.dtype) if num_tokens is None else num_tokens
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    old = old_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype).expand_as(logprobs)
    log_ratio = torch.where(m, logprobs - old, zero).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_hi)
    pg = torch.maximum(pg1, pg2)
    pg_loss = (pg * mf).sum() / denom
    loss = pg_loss
    kl_mean = zero
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().to(logprobs.dtype), logprobs.detach())
        kl_tok = torch.where(m, _kl(logprobs, ref, kl_estimator), zero)
        kl_mean = kl_tok.sum() / denom
        if kl_coef:
            loss = loss + kl_coef * kl_mean

    with torch.no_grad():
        n = max(int(count), 1)
        lr = log_ratio.detach()
        stats = {
            "pg_loss": float(pg_loss.detach()),
            "kl": float(kl_mean.detach()),
            "clip_frac": float(((pg2 > pg1) & m).sum()) / n,
            "approx_kl": float(((torch.expm1(-lr) + lr) * mf).sum()) / n,
            "ratio_mean": float((ratio * mf).sum()) / n,
            "ratio_max": float(torch.where(m, ratio, zero).max()) if int(count) else 0.0,
            "tokens": int(count),
        }
    return loss, stats


def grpo_advantages(
    rewards,
    group_ids=None,
    *,
    group_size: int | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std
    (unbiased, as DeepSeekMath / TRL) + ``eps`` when ``normalize_std`` (Dr. GRPO: False).

    Groups are given by ``group_ids`` (one id per reward, any integers, in any order) or by
    ``group_size`` (consecutive blocks; an int passed as ``group_ids`` means the same). A group
    whose rewards are all equal (or of size 1) gets advantage 0. Returns fp32 ``[N]``.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if isinstance(group_ids, int) and not isinstance(group_ids, bool):
        group_ids, group_size = None, group_ids
    if (group_ids is None) == (group_size is None):
        raise ValueError("give exactly one of group_ids or group_size")
    if group_size is not None:
        if group_size < 1 or r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards are not a whole number of groups of {group_size}")
        g = torch.arange(r.numel(), device=r.device) // group_size
    else:
        g_in = torch.as_tensor(group_ids, device=r.device).reshape(-1)
        if g_in.numel() != r.numel():
            raise ValueError(f"{r.numel()} rewards but {g_in.numel()} group ids")
        _, g = torch.unique(g_in, return_inverse=True)
    k = int(g.max()) + 1 if r.numel() else 0
    cnt = torch.zeros(k, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(k, device=r.device).index_add_(0, g, r) / cnt
    centered = r - mean[g]
    if not normalize_std:
        return centered
    ss = torch.zeros(k, device=r.device).index_add_(0, g, centered.square())
    std = (ss / (cnt - 1).clamp(min=1)).sqrt()
    return centered / (std[g] + eps)
