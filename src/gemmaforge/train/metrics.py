"""Metrics of a run: ``metrics.jsonl`` (one row per optimizer step and evaluation) and ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_metrics(metrics_path: str | Path, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and not r.get("skipped")]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1.5)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def plot_series(metrics_path: str | Path, png: str | Path, names: list[str], ylabel: str = "") -> Path:
    """Curves of ``names`` from ``metrics.jsonl``: the training steps' values as lines, the validation's
    (``val_<name>``) as markers, one panel per name (a task's own metrics: DPO rewards, GRPO reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        tr = [(r["step"], r[name]) for r in rows if name in r and not r.get("skipped")]
        va = [(r["step"], r[f"val_{name}"]) for r in rows if f"val_{name}" in r]
        if tr:
            ax.plot(*zip(*tr), label="train", lw=1.3)
        if va:
            ax.plot(*zip(*va), "o-", label="validation", lw=1.3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if tr or va:
            ax.legend(fontsize=7)
    if ylabel:
        axes[0][0].set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def _scalars(row: dict) -> dict[str, float]:
    """A metrics row's numbers under TensorBoard / wandb tags: ``train/loss``, ``train/lr``, ``val/loss``..."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"] = float(v)
    return out


class MetricSinks:
    """Where a run's metrics rows go besides ``metrics.jsonl``: ``tensorboard`` (event files in
    ``RUN/tensorboard``; the ``tensorboard`` package) and ``wandb`` (``RUN/wandb``; offline without
    network or account: ``WANDB_MODE=offline``, or automatically when no API key is configured).
    ``first_step``: a resumed run's first new step (TensorBoard hides the interrupted run's events from
    there on). Missing packages or a failing ``wandb.init`` raise one ConfigError line."""

    def __init__(self, names: list[str], run_dir: str | Path, config: dict, first_step: int = 0,
                 log=lambda msg: None):
        from ..errors import ConfigError

        self.tb = self.wandb = None
        run_dir = Path(run_dir)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--log tensorboard needs the tensorboard package: pip install "
                                  "'gemmaforge[tensorboard]'") from None
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=first_step if first_step > 0 else None)
            log(f"tensorboard: {run_dir / 'tensorboard'} (tensorboard --logdir {run_dir / 'tensorboard'})")
        if "wandb" in names:
            self.wandb = _wandb_run(run_dir, config, log)

    def write(self, row: dict) -> None:
        scalars = _scalars(row)
        if not scalars:
            return
        step = int(row.get("step", 0))
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, global_step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run_dir: Path, config: dict, log):
    """A wandb run that a resumed run continues (its id is kept in ``RUN/wandb/run-id``)."""
    import os

    from ..errors import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError("--log wandb needs the wandb package: pip install wandb") from None
    d = run_dir / "wandb"
    d.mkdir(exist_ok=True)
    id_file = d / "run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        import secrets

        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        try:
            has_key = bool(wandb.api.api_key)
        except Exception:  # noqa: BLE001 - no settings / no netrc: no key
            has_key = False
        if not has_key:
            mode = "offline"
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gemmaforge"), name=run_dir.name, id=run_id,
                         resume="allow", dir=str(run_dir), config=config, mode=mode)
    except Exception as e:  # noqa: BLE001 - wandb's own errors: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--log wandb: wandb.init failed ({first}); WANDB_MODE=offline logs without network "
                          f"or account") from None
    where = f"offline in {d} (wandb sync {d}/offline-run-*)" if mode == "offline" else getattr(run, "url", "")
    log(f"wandb: run {run_id} {where}".rstrip())
    return run


# a task's own metrics shown on the plain log line (DPO, GRPO)
_TASK_KEYS = ("reward_accuracy", "reward_margin", "reward_mean", "kl", "entropy", "completion_len")


def plain_line(row: dict, steps: int, elapsed: float, done: int) -> str:
    """One log line for a step when there is no progress bar: step, loss, lr, grad norm, throughput, time.
    ``done``: steps this process has run in ``elapsed`` seconds (for the ETA)."""
    step = row["step"]
    parts = [f"step {step}/{steps}"]
    if row.get("skipped"):
        parts.append("skipped (non-finite)")
    else:
        parts.append(f"loss {row['loss']:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    if "grad_norm" in row:
        parts.append(f"grad_norm {row['grad_norm']:.3g}")
    parts.append(f"{row.get('tokens_per_s', 0):.0f} tok/s")
    for k in _TASK_KEYS:
        if k in row:
            parts.append(f"{k} {row[k]:.3g}")
    if "val_loss" in row:
        ppl = f" (perplexity {row['val_ppl']:.2f})" if "val_ppl" in row else ""
        parts.append(f"val_loss {row['val_loss']:.4f}{ppl}")
        for k in _TASK_KEYS:
            if f"val_{k}" in row:
                parts.append(f"val_{k} {row[f'val_{k}']:.3g}")
    eta = elapsed / max(done, 1) * (steps - step)
    parts.append(f"{_clock(elapsed)} elapsed, {_clock(eta)} left")
    return "  ".join(parts)


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
