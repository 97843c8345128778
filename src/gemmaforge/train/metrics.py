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
