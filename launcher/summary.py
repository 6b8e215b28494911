"""Stage 5: summary.json, metrics.png, and the final report of a run as lines to show."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.recipe import Recipe
from launcher.rundir import MODEL_DIR, PLOT_FILE, SUMMARY_FILE, RunState, read_metrics
from launcher.tokenize import TRUNCATED


def format_value(value: Any) -> str:
    """A metric as shown to people: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of each metric over the run."""
    final: dict[str, Any] = {}
    for row in metrics:
        final.update({k: v for k, v in row.items() if k != "event"})
    return final


def data_facts(data) -> dict[str, Any]:
    """Rows and tokens per split, and how often tokenization ran (once per row, in Ray Data)."""
    facts = {
        "rows": data.num_rows,
        "raw_rows": data.raw_rows,
        "tokens": data.num_tokens,
        "tokenization": data.tokenization_runs(),
        # Rows left out, and apart from them the rows kept but cut at data.max_length.
        "dropped": {
            split: {r: n for r, n in reasons.items() if r != TRUNCATED}
            for split, reasons in data.dropped.items()
            if any(r != TRUNCATED for r in reasons)
        },
        "truncated": {
            split: reasons[TRUNCATED]
            for split, reasons in data.dropped.items()
            if TRUNCATED in reasons
        },
    }
    if getattr(data, "cache", None):
        facts["prepared"] = data.cache
    return facts


def placement_facts(recipe: Recipe, state: RunState) -> dict[str, Any]:
    """The placement asked for, how many nodes the workers ran on, and each rank's node."""
    ranks = [{"rank": rank, **state.placement[rank]} for rank in sorted(state.placement)]
    return {
        "strategy": recipe.scaling.placement,
        "nodes": len({r["node_id"] for r in ranks}),
        "ranks": ranks,
    }


def write_summary(
    recipe: Recipe,
    state: RunState,
    status: str,
    extra: dict[str, Any],
    planned_steps: int | None,
) -> dict[str, Any]:
    """Write summary.json (and metrics.png when there are reports); returns the summary."""
    metrics = read_metrics(state.run_dir) or state.metrics
    rows = [m for m in metrics if "event" not in m]
    wall = time.time() - state.started
    tokens = sum(float(m.get("tokens", 0)) for m in rows)
    train_time = sum(
        float(m["tokens"]) / m["tokens_per_s"]
        for m in rows
        if m.get("tokens_per_s") and m.get("tokens")
    )
    summary = {
        "name": recipe.name,
        "status": status,
        "ftlaunch_version": __version__,
        "run_dir": str(state.run_dir),
        "started_at": datetime.fromtimestamp(state.started, timezone.utc).isoformat(),
        "wall_time_s": round(wall, 3),
        "steps": int(rows[-1]["step"]) if rows else 0,
        "planned_steps": planned_steps,
        "tokens": int(tokens),
        "tokens_per_s": (tokens / train_time) if train_time > 0 else None,
        "restarts": state.restarts,
        "replayed_reports": state.replayed,
        # checkpoints taken because Ray announced a node's preemption (step, nodes, deadline)
        "preemptions": state.preemptions,
        "timings_s": state.timings,
        "parameters": state.parameters,
        "final_metrics": final_metrics(rows),
        "strategy": recipe.strategy.name,
        "method": recipe.finetune.method,
        "task": recipe.model.task,
        "num_workers": recipe.scaling.num_workers,
        "world_size_changes": state.world_size_changes,
        "placement": placement_facts(recipe, state),
        **extra,
    }
    if state.notes:
        summary["notes"] = state.notes
    (state.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if rows:
        plot_metrics(rows, state.run_dir / PLOT_FILE, title=recipe.name)
    return summary


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


def final_report(summary: dict[str, Any]) -> list[str]:
    """The end of a run as lines: where it is, how it went, what to try next."""
    run_dir = summary["run_dir"]
    lines = ["", f"run {summary['status']}: {run_dir}"]
    final = summary.get("final_metrics", {})
    shown = {k: v for k, v in final.items() if k in ("loss",) or k.startswith("eval_")}
    if shown:
        lines.append("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    for key, value in (summary.get("eval") or {}).items():
        if isinstance(value, int | float):
            lines.append(f"evaluation {key}: {value:.4g}")
    lines.append(f"steps: {summary['steps']}, wall time: {summary['wall_time_s']:.1f}s")
    lines.append("next:")
    lines.append(f"  ftlaunch eval {run_dir} --data <file>       # score it on more data")
    causal = summary.get("task", "causal_lm") == "causal_lm"
    if causal:
        lines.append(f"  ftlaunch generate {run_dir} --prompts <file> --out out.jsonl")
    if (summary.get("export") or {}).get("standalone", True):
        pipeline = "text-generation" if causal else "text-classification"
        lines.append(
            f'  python -c "from transformers import pipeline; '
            f"print(pipeline('{pipeline}', model='{run_dir}/{MODEL_DIR}')('...'))\""
        )
    else:  # model/ alone is the base: its trained part is in model/adapter
        lines.append(
            '  python -c "from launcher.export_layout import load_exported_model; '
            f"print(load_exported_model('{run_dir}'))\""
        )
    return lines
