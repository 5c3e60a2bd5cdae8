"""The metrics of a run: ``metrics.jsonl`` (one JSON object per epoch) and the plot
``metrics.png`` (accuracy, loss and solver steps per epoch)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ._files import atomic_write, write_text


METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def write_metrics(out_dir: str | os.PathLike, history: Sequence[dict]) -> None:
    """`metrics.jsonl` (one JSON object per epoch) and the plot `metrics.png`."""
    out_dir = Path(out_dir)
    write_text(out_dir / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))
    if history:
        plot_metrics(history, out_dir / PLOT_FILE)


def plot_metrics(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Accuracy, loss and solver steps per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax.set(title="accuracy (%)", xlabel="epoch")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax.set(title="cross-entropy", xlabel="epoch", yscale="log")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [h["fwd_steps"] for h in history], "o-", label="forward (train)")
    ax.plot(epochs, [h["test_fwd_steps"] for h in history], "s-", label="forward (test)")
    ax.plot(epochs, [h["bwd_steps"] for h in history], "^-", label="backward")
    ax.set(title="mean solver steps per sample", xlabel="epoch")
    ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()

    def save(p):
        with open(p, "wb") as f:
            fig.savefig(f, format="png", dpi=100)

    atomic_write(Path(path), save)
    plt.close(fig)
