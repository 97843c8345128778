"""``gemmaforge dpo``: direct preference optimisation (or IPO) on ``{"prompt", "chosen", "rejected"}`` pairs,
through the same Trainer as ``gemmaforge train`` (its flags, LoRA, activation checkpointing, FSDP2 under
torchrun, checkpoints and exact resume)."""

from __future__ import annotations

import json

from .train import add_training_args, run_training


def register(sub) -> None:
    t = sub.add_parser("dpo", help="preference tuning (DPO / IPO) on JSONL pairs {prompt, chosen, rejected}")
    add_training_args(t, layouts=False)
    for action in t._actions:
        if "--data" in action.option_strings:
            action.help = ('preference pairs, .jsonl: {"prompt", "chosen", "rejected"} strings, or chat form '
                           '(prompt: a list of messages; chosen/rejected: assistant messages)')
        if "--val-data" in action.option_strings:
            action.help = "held-out preference pairs of one's own (.jsonl): their rewards and accuracy are reported"
    t.add_argument("--beta", type=float, default=None, help="strength of the pull to the reference (default 0.1)")
    t.add_argument("--loss", default=None, choices=["sigmoid", "ipo"],
                   help="sigmoid: DPO (default); ipo: IPO on per-token averaged log-probs")
    t.add_argument("--reference", default=None, choices=["precompute", "live"],
                   help="precompute (default): a full fine-tune's reference log-probs of every row once before "
                        "step 1 by the base weights, no frozen copy kept (one model in memory, not two); live: a "
                        "frozen copy scores each batch. With LoRA the reference is the policy with its adapters disabled")
    t.set_defaults(func=cmd_dpo)


def task_settings(a, keys: dict) -> dict:
    """The task flags given, over a resumed run's own (``RUN/task.json``), over the defaults."""
    from ..train.config import run_dir_of

    out = dict(keys)
    resume = a.resume if isinstance(a.resume, str) else (a.out if a.resume is not None else None)
    if resume:
        f = run_dir_of(resume) / "task.json"
        if f.is_file():
            saved = json.loads(f.read_text())
            out.update({k: saved[k] for k in keys if k in saved})
    for k in keys:
        v = getattr(a, "loss" if k == "loss_type" else k, None)
        if v is not None:
            out[k] = v
    return out


def cmd_dpo(a) -> int:
    from ..train.tasks import DPOTask

    def task():
        s = task_settings(a, {"beta": 0.1, "loss_type": "sigmoid", "reference": "precompute"})
        return DPOTask(beta=s["beta"], loss_type=s["loss_type"], reference=s["reference"])

    return run_training(a, before=task)
