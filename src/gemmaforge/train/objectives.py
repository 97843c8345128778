"""Training objectives: what turns a micro-batch and the model's final hidden states into a loss.

An objective is a small object with three parts:

* ``targets(batch) -> {name: [T] tensor}``: the per-token fields it reads (labels, later advantages,
  reference log-probs...). The step slices them with the tokens when a row is split over ranks
  (context parallelism) and sends them through the pipeline schedule (pipeline parallelism).
* ``count(batch) -> int``: how many tokens of the micro-batch count for normalisation. The step
  sums it over the step's micro-batches and the data-parallel ranks: the ONE global count that
  every loss is divided by, so every layout gives the single-process gradient.
* ``loss(model, hidden [N, H], targets) -> scalar``: the SUMMED loss of those tokens (fp32).

The step never looks inside; new objectives (DPO, GRPO) add a class here. Two optional parts the
Trainer reads: ``pop_metrics() -> {name: (sum, weight)}`` (what the objective measured in its ``loss``
calls since the last pop; the Trainer sums them over the data-parallel ranks and logs ``sum / weight``)
and ``perplexity`` (whether ``exp(loss)`` means something: validation reports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rl.dpo import LOSS_TYPES, dpo_loss

IGNORE = -100


@dataclass
class CausalLMLoss:
    """Token cross-entropy against the packed rows' pre-shifted ``labels`` (-100 = no loss), through
    the LM head in chunks of ``chunk_size`` tokens (the ``[T, vocab]`` logits never exist)."""

    chunk_size: int = 1024
    perplexity = True

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"labels": batch["labels"].reshape(-1)}

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, hidden: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.lm_head.cross_entropy(hidden, targets["labels"], chunk_size=self.chunk_size, reduction="sum")

    def pop_metrics(self) -> dict:
        return {}


class _Tally:
    """Sums of per-item metrics over ``loss`` calls, popped by the Trainer after a step / an evaluation."""

    def _add(self, name: str, total: float, weight: float) -> None:
        s, w = self._sums.get(name, (0.0, 0.0))
        self._sums[name] = (s + float(total), w + float(weight))

    def pop_metrics(self) -> dict:
        out, self._sums = self._sums, {}
        return out


@dataclass
class DPOLoss(_Tally):
    """DPO (``loss_type="sigmoid"``) or IPO on packed preference pairs (``rl.dpo.pack_pairs``): per pair,
    the policy's and the reference's summed log-probs of the chosen and the rejected completion (IPO:
    averaged over their tokens), ``rl.dpo.dpo_loss`` of them, summed over the pairs; ``count`` is the
    number of pairs, so the step's loss is the mean over the step's pairs. Targets: ``labels``, ``seq``
    (the completion sequence each position predicts: ``2k`` chosen, ``2k + 1`` rejected, -1 none) and
    ``ref_logprobs`` (per token, from the batch source's reference). Metrics: ``reward_chosen``,
    ``reward_rejected``, ``reward_margin``, ``reward_accuracy`` (chosen reward above rejected), per pair."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    chunk_size: int = 256  # tokens per logits chunk: [256, 262144] fp32 is 256 MiB (512: peak +0.3 GiB, no faster)
    _sums: dict = field(default_factory=dict, repr=False)
    perplexity = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            from ..errors import ConfigError

            raise ConfigError(f"--loss {self.loss_type}: use {' or '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            from ..errors import ConfigError

            raise ConfigError(f"--beta must be positive (got {self.beta})")

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"labels": batch["labels"].reshape(-1), "seq": batch["seq"].reshape(-1),
                "ref_logprobs": batch["ref_logprobs"].reshape(-1)}

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def sequence_logprobs(self, model, hidden: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(policy, reference)`` ``[2P]`` log-probs of every completion (summed; IPO: averaged)."""
        seq = targets["seq"]
        idx = (seq >= 0).nonzero().squeeze(1)
        s = seq.index_select(0, idx)
        n = int(s.max()) + 1 if s.numel() else 0
        lp = model.lm_head.logprobs(hidden.index_select(0, idx), targets["labels"].index_select(0, idx),
                                    chunk_size=self.chunk_size)
        pol = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, s, lp.float())
        ref = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(
            0, s, targets["ref_logprobs"].index_select(0, idx).float())
        if self.loss_type == "ipo":
            lengths = torch.bincount(s, minlength=n).clamp(min=1).to(torch.float32)
            pol, ref = pol / lengths, ref / lengths
        return pol, ref

    def loss(self, model, hidden: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        pol, ref = self.sequence_logprobs(model, hidden, targets)
        losses, rc, rr = dpo_loss(pol[0::2], pol[1::2], ref[0::2], ref[1::2], beta=self.beta,
                                  loss_type=self.loss_type)
        n = losses.numel()
        self._add("reward_chosen", rc.sum(), n)
        self._add("reward_rejected", rr.sum(), n)
        self._add("reward_margin", (rc - rr).sum(), n)
        self._add("reward_accuracy", (rc > rr).sum(), n)
        return losses.sum()


@dataclass
class GRPOLoss(_Tally):
    """GRPO's clipped token-level policy loss with a k3 KL penalty to the reference (``rl.score.policy_loss``),
    summed over the completion tokens; ``count`` is their number, so the step's loss is the mean over the
    step's completion tokens (every rank's, every micro-batch's). Targets: ``labels``, ``adv`` (the
    rollout's group-normalised advantage on each of its completion tokens), ``old_logprobs`` (the sampling
    policy's; absent when a rollout batch serves one update: then they are the current log-probs,
    detached) and ``ref_logprobs`` (with ``beta > 0``). Log-probs are of ``softmax(logits / temperature)``,
    the distribution sampled from. Metrics per completion token: ``kl``, ``entropy``, ``clip_fraction``."""

    beta: float = 0.04
    clip_eps: float = 0.2
    temperature: float = 1.0
    chunk_size: int = 256  # tokens per logits chunk: [256, 262144] fp32 is 256 MiB (512: peak +0.3 GiB, no faster)
    _sums: dict = field(default_factory=dict, repr=False)
    perplexity = False

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        t = {"labels": batch["labels"].reshape(-1), "adv": batch["adv"].reshape(-1)}
        for k in ("old_logprobs", "ref_logprobs"):
            if k in batch:
                t[k] = batch[k].reshape(-1)
        return t

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, hidden: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        from ..rl.score import policy_loss

        labels = targets["labels"]
        valid = labels != IGNORE
        idx = valid.nonzero().squeeze(1)
        n = int(idx.numel())
        if n == 0:  # a padding row: the head still runs (its collectives stay in step with the other ranks)
            idx = torch.zeros(1, dtype=torch.long, device=labels.device)
        y = labels.index_select(0, idx).clamp(min=0)
        lp, ent = model.lm_head.logprobs(hidden.index_select(0, idx), y, temperature=self.temperature,
                                         chunk_size=self.chunk_size, return_entropy=True)
        mask = valid.index_select(0, idx)
        old = targets["old_logprobs"].index_select(0, idx) if "old_logprobs" in targets else lp.detach()
        ref = targets["ref_logprobs"].index_select(0, idx) if "ref_logprobs" in targets else None
        loss, st = policy_loss(lp, old, targets["adv"].index_select(0, idx), mask, clip_eps=self.clip_eps,
                               kl_coef=self.beta if ref is not None else 0.0, ref_logprobs=ref, num_tokens=1)
        if n:
            self._add("kl", st["kl"], n)
            self._add("entropy", (ent.detach() * mask).sum(), n)
            self._add("clip_fraction", st["clip_frac"] * n, n)
        return loss
