"""One live progress display for a training run (instead of Ray's log flood)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressView:
    """Step/total, loss, tokens/s and ETA on a terminal; one plain line per report elsewhere."""

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=False, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self.started = 0.0

    def start(self, total_steps: int) -> None:
        """Begin showing training progress towards `total_steps` optimizer steps."""
        self.total, self.started = total_steps, time.perf_counter()
        if not self.live:
            self.note(f"training for {total_steps} steps")
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, stats="")
        self.progress.start()

    def update(self, metrics: dict[str, Any]) -> None:
        """Show one report: training stats on the bar, evaluation results as a line."""
        stats = format_stats(metrics)
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        if self.progress is not None:
            self.progress.update(self.task, completed=metrics.get("step", 0), stats=stats)
        else:
            step = int(metrics.get("step", 0))
            eta = self._eta(step)
            self.console.print(f"step {step}/{self.total}  {stats}{eta}", soft_wrap=True)
        if evals and self.progress is not None:
            self.note("eval @ step {}: {}".format(int(metrics.get("step", 0)), format_stats(evals)))

    def _eta(self, step: int) -> str:
        if step <= 0 or self.total <= step:
            return ""
        elapsed = time.perf_counter() - self.started
        return f"  eta {elapsed / step * (self.total - step):.0f}s"

    def note(self, text: str) -> None:
        """A line of its own (above the bar when it is live)."""
        self.console.print(text, soft_wrap=True)
        sys.stdout.flush()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_stats(metrics: dict[str, Any]) -> str:
    """Compact `key=value` text for the metrics a person watches."""
    keys = (
        "loss",
        "task_loss",
        "distill_loss",
        "lr",
        "tokens_per_s",
        "eval_loss",
        "eval_perplexity",
        "eval_accuracy",
        "eval_f1",
    )
    parts = []
    for key in keys:
        if key in metrics and metrics[key] is not None:
            value = metrics[key]
            if key == "tokens_per_s":
                parts.append(f"tok/s={value:,.0f}")
            elif key == "lr":
                parts.append(f"lr={value:.2e}")
            else:
                parts.append(f"{key}={value:.4f}")
    return "  ".join(parts)


@contextmanager
def progress_display(
    total: int | None, description: str, enabled: bool = True, unit: str = "rows"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr with units done, units/s and ETA; yields advance(n).

    For long work outside training: the batch stage's rows, the streamed data preparation's
    pieces."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    start = time.monotonic()
    with progress:
        task = progress.add_task(description, total=total, rate=0.0)

        def advance(rows: int) -> None:
            done = progress.tasks[0].completed + rows
            rate = done / max(time.monotonic() - start, 1e-9)
            progress.update(task, advance=rows, rate=rate)

        yield advance
