"""The driver: data -> train -> export -> batch -> summary. The same code on every target.

`python -m launcher.job RECIPE` runs it against the Ray cluster in RAY_ADDRESS (a Ray Job, a
KubeRay RayJob) or an embedded Ray started here; `ftlaunch submit` starts it in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launcher.chat import DROP_TOO_LONG
from launcher.errors import exit_code_for
from launcher.prepared import (
    CacheLookup,
    entry_size,
    load_or_prepare,
    lookup,
    read_meta,
    streams,
)
from launcher.progress import ProgressView
from launcher.raysession import ensure_ray, quiet_ray_data
from launcher.recipe import Recipe, dump_recipe, load_recipe
from launcher.rundir import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    RunState,
    Stopwatch,
    latest_checkpoint,
    new_run_dir,
    upload_run_dir,
)
from launcher.summary import data_facts, final_report, format_value, write_summary
from launcher.tokenize import TRUNCATED
from launcher.train import Preempted, pick_checkpoint, train


def run(
    recipe: Recipe,
    *,
    resume: Path | None = None,
    verbose: bool = False,
    view: ProgressView | None = None,
) -> dict[str, Any]:
    """Run the whole job and return the summary. Raises DataError/ModelLoadError/LayoutError
    for bad input (before any training) and JobError when training fails."""
    from launcher.batch.jobs import source_metrics
    from launcher.distill import prepare_distillation

    view = view or ProgressView()
    clock = Stopwatch()
    resume_from = None
    if resume is not None:  # a run without a checkpoint fails before any work
        resume = resume.resolve()
        resume_from = checkpoint_to_resume(resume)
    with clock("load"):  # bad input (model path, data files, rows) fails here, before Ray starts
        tokenizer, slot, tables = open_data(recipe)
    with clock("ray_start"):
        ensure_ray(verbose)
        quiet_ray_data(verbose)

    note_data(view, slot)  # 1. data
    with clock("data"):
        data = load_or_prepare(slot, recipe, tokenizer, tables=tables)
        recipe, data = prepare_distillation(recipe, data, tokenizer, view)  # teacher, offline pass
    view.note("rows: " + ", ".join(f"{k}={v:,}" for k, v in data.num_rows.items()))
    for split, reasons in data.dropped.items():
        view.note(f"{split}: {describe_drops(reasons, recipe.data.max_length, recipe.data.format)}")

    state = open_run(recipe, resume, clock)
    view.note(f"run directory: {state.run_dir}")
    if resume_from is not None:
        view.note(f"resuming from {resume_from}")
    plan = None
    try:
        with clock("train"):  # 2. train
            result, plan, metric = train(recipe, data, tokenizer, state, view, resume_from)
        checkpoint = pick_checkpoint(result, metric, recipe.checkpoint.mode, state.run_dir)
        view.note(f"exporting {Path(checkpoint.path).name} to {state.run_dir / MODEL_DIR}")
        with clock("export"):  # 3. export
            exported = export_stage(recipe, checkpoint, state.run_dir, tokenizer)
        if not exported.get("standalone", True):  # model/ alone is not the trained model
            view.note(f"export: {exported['note']}")
        with clock("batch"):  # 4. batch
            batch = batch_stage(recipe, state.run_dir, view)
            batch.update(source_metrics(recipe, data, state.run_dir, view))  # per source
    except BaseException as exc:
        status = "preempted" if isinstance(exc, Preempted) else "failed"
        extra = {"error": str(exc), "data": data_facts(data)}
        finish(recipe, state, status, extra, plan.total_steps if plan else None)
        raise
    extra = {"export": exported, **batch, "data": data_facts(data)}  # 5. summary
    if state.remote:
        extra["storage"] = state.remote
    summary = finish(recipe, state, "succeeded", extra, plan.total_steps)
    if state.remote:
        view.note(f"uploaded the run directory to {state.remote}")
    return summary


def open_data(recipe: Recipe) -> tuple[Any, CacheLookup, dict | None]:
    """The tokenizer, the recipe's prepared-data cache slot, and (on a cache miss) every split
    read and validated, so bad data fails before Ray starts. Large sources are not read here:
    Ray Data tasks validate them while preparing (bad data still fails before training)."""
    from launcher.data import load_tables
    from launcher.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    slot = lookup(recipe, tokenizer)
    skip = slot.hit or streams(slot)
    if skip:
        return tokenizer, slot, None
    return tokenizer, slot, load_tables(recipe, tokenizer=tokenizer, loaded=slot.hf_datasets)


def note_data(view: ProgressView, slot: CacheLookup) -> None:
    if slot.hit:
        rows = sum(split["rows"] for split in slot.meta["splits"].values())
        view.note(f"prepared data: reusing {slot.fingerprint} ({rows:,} rows)")
    else:
        view.note("preparing data (tokenizing once)")


def prepare(recipe: Recipe, *, verbose: bool = False) -> dict[str, Any]:
    """`ftlaunch prepare`: build the recipe's prepared-dataset cache entry (or find it).

    Returns its fingerprint, path, size in bytes, whether it already existed, and rows/tokens
    per split."""
    tokenizer, slot, tables = open_data(recipe)
    if not slot.hit:
        ensure_ray(verbose)
        quiet_ray_data(verbose)
        load_or_prepare(slot, recipe, tokenizer, tables=tables)
    meta = read_meta(slot.path) or {}
    return {
        "fingerprint": slot.fingerprint,
        "path": str(slot.path),
        "bytes": entry_size(slot.path),
        "reused": slot.hit,
        "splits": meta.get("splits", {}),
    }


def open_run(recipe: Recipe, resume: Path | None, clock: Stopwatch) -> RunState:
    """A new run directory, or the one --resume names."""
    if resume is None:
        text = dump_recipe(recipe)
        run_dir, remote = new_run_dir(recipe.name, recipe.checkpoint.storage_path, text)
        return RunState(run_dir, remote, timings=clock.timings, started=clock.started)
    return RunState(resume, timings=clock.timings, started=clock.started)


def checkpoint_to_resume(run_dir: Path) -> Path:
    """The newest complete checkpoint of the run directory --resume names."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(
            f"--resume {run_dir}: no checkpoint found under {run_dir / CHECKPOINTS_DIR}"
        )
    return found


def describe_drops(reasons: dict[str, int], max_length: int, data_format: str = "chat") -> str:
    """One line saying how many rows were left out or cut short, and why."""
    too_long = (
        "prompt, response and end-of-sequence token"
        if data_format == "instruction"
        else "first trained turn"
    )
    why = {DROP_TOO_LONG: f"{too_long} longer than data.max_length={max_length}"}
    parts = [
        f"{n:,} rows truncated to data.max_length={max_length} tokens (the rest of their text "
        "is not seen; raise data.max_length to keep it)"
        if reason == TRUNCATED
        else f"{n:,} rows dropped ({why.get(reason, reason)})"
        for reason, n in reasons.items()
    ]
    return "; ".join(parts)


def export_stage(recipe: Recipe, checkpoint, run_dir: Path, tokenizer) -> dict[str, Any]:
    """Stage 3: consolidate the checkpoint into a Hugging Face model in run_dir/model."""
    from launcher.export import export_checkpoint

    with checkpoint.as_directory() as local:  # downloads it first when storage is remote
        info = export_checkpoint(
            recipe, Path(local), run_dir, tokenizer, recipe.checkpoint.export.merge_lora
        )
    return {**info, "checkpoint": checkpoint.path}


def batch_stage(recipe: Recipe, run_dir: Path, view: ProgressView) -> dict[str, Any]:
    """Stage 4: batch evaluation and generation with Ray Data over the exported model."""
    out: dict[str, Any] = {}
    if recipe.evaluate is not None:
        from launcher.batch import evaluate_run

        out["eval"] = evaluate_run(recipe, run_dir)
        scores = [
            f"{k}={format_value(v)}" for k, v in out["eval"].items() if isinstance(v, int | float)
        ]
        view.note("evaluation: " + ", ".join(scores))
    if recipe.generate is not None and recipe.generate.prompts:
        from launcher.batch import generate_run

        path = generate_run(recipe, run_dir)
        out["generations"] = str(path)
        view.note(f"generations written to {path}")
    return out


def finish(
    recipe: Recipe,
    state: RunState,
    status: str,
    extra: dict[str, Any],
    planned_steps: int | None,
) -> dict[str, Any]:
    """Stage 5: summary.json and metrics.png, uploaded beside the checkpoints on URI storage."""
    summary = write_summary(recipe, state, status, extra, planned_steps)
    if state.remote:
        upload_run_dir(state.run_dir, state.remote)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.job RECIPE [--set k=v ...] [--resume RUN_DIR] [--verbose]`.

    The entry point of remote targets (a Ray Job, a KubeRay RayJob): the job's log is its output.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m launcher.job", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        summary = run(recipe, resume=args.resume, verbose=args.verbose)
    except Exception as exc:
        code = exit_code_for(exc)
        if code == 1 and args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return code
    print("\n".join(final_report(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
