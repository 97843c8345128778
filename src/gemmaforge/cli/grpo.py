"""``gemmaforge grpo``: group relative policy optimisation with a reward function of one's own, through the same
Trainer as ``gemmaforge train`` (its flags, LoRA, activation checkpointing, FSDP2 under torchrun, checkpoints
and exact resume)."""

from __future__ import annotations

from .dpo import task_settings
from .train import add_training_args, run_training

_GRPO_FLAGS = [
    # (flag, type, default, help)
    ("--group-size", int, 8, "completions sampled per prompt (their rewards are normalised within the group)"),
    ("--prompts-per-step", int, 2, "prompts per rollout batch"),
    ("--max-new-tokens", int, 128, "longest completion"),
    ("--temperature", float, 1.0, "sampling temperature (the policy's log-probs are of the same distribution)"),
    ("--beta", float, 0.04, "KL penalty to the reference policy (k3 estimate); 0: no reference"),
    ("--updates-per-batch", int, 1, "optimizer steps on each rollout batch (old log-probs recorded at rollout time)"),
    ("--clip-eps", float, 0.2, "PPO clipping of the probability ratio"),
]


def register(sub) -> None:
    t = sub.add_parser("grpo", help="reinforcement learning (GRPO) on JSONL prompts with a reward function")
    add_training_args(t, layouts=False)
    for action in t._actions:
        if "--data" in action.option_strings:
            action.help = ('prompts, .jsonl: {"prompt": str or messages, ...}; the other fields reach the reward '
                           'function (e.g. "answer")')
    t.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                   help="fn(prompt, completion, row) -> float, e.g. gemmaforge.rl.rewards:exact_match "
                        "(row['answer']), gemmaforge.rl.rewards:regex_format, or path/to/file.py:fn")
    for flag, typ, default, help_ in _GRPO_FLAGS:
        t.add_argument(flag, type=typ, default=None, help=f"{help_} (default {default})")
    t.set_defaults(func=cmd_grpo)


def cmd_grpo(a) -> int:
    from ..errors import ConfigError
    from ..train.tasks import GRPOTask

    def task():
        keys = {flag[2:].replace("-", "_"): default for flag, _, default, _ in _GRPO_FLAGS}
        s = task_settings(a, {**keys, "reward": None})
        if not s["reward"]:
            raise ConfigError("grpo needs --reward MODULE:FUNCTION (e.g. gemmaforge.rl.rewards:exact_match)")
        reward = s.pop("reward")
        return GRPOTask(reward, **s)

    return run_training(a, before=task)
