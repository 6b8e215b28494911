"""metrics.png: training loss and evaluation curves of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Plot loss (and task/distill parts) and every eval_* metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = sorted({k for r in rows for k in r if k.startswith("eval_")})
    panels = 1 + len(evals)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    loss_ax = axes[0][0]
    for key in ("loss", "task_loss", "distill_loss"):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            loss_ax.plot(
                *zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None
            )
    loss_ax.set_xlabel("step")
    loss_ax.set_title("training loss")
    loss_ax.legend()
    for ax, key in zip(axes[0][1:], evals, strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points, strict=True), marker="o", color="tab:orange")
        ax.set_xlabel("step")
        ax.set_title(key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
