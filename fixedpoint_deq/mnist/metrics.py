"""The metrics of a run: ``metrics.jsonl`` (one JSON object per epoch) and the plot
``metrics.png`` (training curves per window of steps, evaluations per epoch)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ._files import atomic_write, write_text, WriteError


METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


def write_metrics(
    out_dir: str | os.PathLike,
    history: Sequence[dict],
    warn: Callable[[str], None] | None = None,
) -> None:
    """`metrics.jsonl` (one JSON object per epoch) and the plot `metrics.png`.

    **Arguments:**

    - `out_dir`: the directory of both files.
    - `history`: the records of the epochs so far.
    - `warn`: called with a one-line message if the plot cannot be written (default: a
      `RuntimeWarning`); the plot is a view of `metrics.jsonl`, so losing it does not
      stop a run.

    **Raises:** `WriteError` (naming the file and the fault) if `metrics.jsonl` cannot
    be written."""
    out_dir = Path(out_dir)
    write_text(out_dir / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))
    if not history:
        return
    try:
        plot_metrics(history, out_dir / PLOT_FILE)
    except WriteError as e:
        message = f"warning: {e}; the plot is not updated ({METRICS_FILE} is)"
        if warn is None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            warn(message)


def plot_metrics(history: Sequence[dict], path: str | os.PathLike) -> None:
    """The run as a PNG (matplotlib, Agg), against training examples seen: error rate
    (log scale), cross-entropy (log scale), forward and backward solver steps per
    sample. Training is drawn per window of steps (the epoch records' ``curve``),
    the test-set evaluations as points at the end of each epoch; so that a one-epoch
    run draws a curve, not one dot per panel. Raises `WriteError` if `path` cannot be
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    curve = [p for h in history for p in h.get("curve", ())]
    ends = [_examples(h, i) for i, h in enumerate(history)]
    x_curve = [p["examples"] for p in curve]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))

    def train_line(ax, value):
        if curve:
            ax.plot(x_curve, [value(p) for p in curve], "-", lw=1, label="train")

    def test_points(ax, value):
        ax.plot(ends, [value(h) for h in history], "o", ms=6, label="test")

    ax = axes[0]
    train_line(ax, lambda p: 100 * (1 - p["acc"]))
    test_points(ax, lambda h: 100 * (1 - h["test_acc"]))
    ax.set(
        title=f"error rate (%); final test accuracy {100 * history[-1]['test_acc']:.2f}%",
        yscale="log",
    )
    ax = axes[1]
    train_line(ax, lambda p: p["loss"])
    test_points(ax, lambda h: h["test_loss"])
    ax.set(title="cross-entropy", yscale="log")
    ax = axes[2]
    train_line(ax, lambda p: p["fwd_steps"])
    test_points(ax, lambda h: h["test_fwd_steps"])
    ax.set(title="forward solver steps per sample")
    ax = axes[3]
    train_line(ax, lambda p: p["bwd_steps"])
    ax.set(title="backward solver steps per sample")
    thousands = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0")
    for ax in axes:
        ax.set_xlabel("training examples seen")
        ax.xaxis.set_major_formatter(thousands)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()

    def save(p):
        with open(p, "wb") as f:
            fig.savefig(f, format="png", dpi=100)

    try:
        atomic_write(Path(path), save)
    finally:
        plt.close(fig)


def _examples(record: dict, index: int) -> float:
    """Training examples seen at the end of an epoch record (its epoch number for the
    records of older runs, which did not count them)."""
    if "examples" in record:
        return record["examples"]
    curve = record.get("curve")
    return curve[-1]["examples"] if curve else float(record.get("epoch", index + 1))
