"""The driver: data -> train -> export -> batch -> summary. The same code on every target.

`python -m launcher.job RECIPE` runs it against the Ray cluster in RAY_ADDRESS (a Ray Job, a
KubeRay RayJob) or an embedded Ray started here; `ftlaunch submit` starts it in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from launcher.errors import BadInputError, JobFailedError, exit_code_for
from launcher.progress import ProgressView
from launcher.recipe import Recipe, dump_recipe, load_recipe
from launcher.train_loop import Plan, latest_checkpoint, make_plan, train_loop_per_worker


class Stopwatch:
    """Seconds spent in each stage of the driver (summary.json `timings_s`)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - begin, 3)


class JobError(JobFailedError):
    """The job itself failed (a worker crashed, training diverged): exit code 1."""


class LayoutError(BadInputError):
    """A resource layout that cannot make progress on this cluster: exit code 2."""


@dataclass
class RunState:
    """What the driver learns while the job runs, for summary.json."""

    run_dir: Path
    remote: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    last_step: int = -1
    replayed: int = 0
    preempted: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- run directory


def is_uri(storage_path: str) -> bool:
    """s3://, gs://, file:// and other pyarrow filesystem URIs (not plain paths)."""
    return "://" in storage_path


def run_name(recipe: Recipe) -> str:
    """<name>-<timestamp> of a new run."""
    return f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(recipe: Recipe) -> tuple[Path, str | None]:
    """Create the run directory with the resolved recipe in it.

    Local storage: <storage_path>/<name>-<timestamp>. URI storage: checkpoints go straight to
    <uri>/<name>-<timestamp>/checkpoints through Ray Train; the driver's own files are staged in
    a local directory and uploaded beside them at the end. Returns (local dir, remote URI).
    """
    storage = recipe.checkpoint.storage_path
    name = run_name(recipe)
    remote = None
    if is_uri(storage):
        remote = f"{storage.rstrip('/')}/{name}"
        root = Path(os.environ.get("FTLAUNCH_STAGING", Path.home() / ".cache/ftlaunch/staging"))
    else:
        root = Path(os.path.expanduser(storage)).resolve()
    run_dir, suffix = root / name, 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{name}-{suffix}"
    if remote is not None and suffix > 1:
        remote = f"{remote}-{suffix}"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return run_dir, remote


def upload_run_dir(run_dir: Path, remote: str) -> None:
    """Copy the driver's files (model, metrics, summary, ...) next to the remote checkpoints."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(remote)
    fs.create_dir(base, recursive=True)
    pafs.copy_files(
        str(run_dir), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every report in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ ray


def ensure_ray(verbose: bool = False) -> None:
    """Connect to RAY_ADDRESS when set, else start an embedded Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
        include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None,
        runtime_env={"env_vars": ray_job_env()},
    )


def ray_job_env() -> dict[str, str]:
    """Environment for every process of the Ray job (controller, workers, data tasks).

    Ray Train's controller drains each worker's one-slot report queue only when it polls, every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a report made before the previous one
    was drained blocks the worker until then. Workers report to Ray Train only with checkpoints
    (metrics go through the driver's sink), so that is rare; polling every second bounds it and
    notices a finished or failed worker sooner. Each poll also takes the worker's GIL away from
    the training thread for a moment: polling every 0.2 s cost a tiny model ~8% of its
    throughput (bench/README.md).
    """
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0"
        ),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", ""),
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    }
    return {k: v for k, v in env.items() if v}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's and transformers' own progress bars and load reports only with --verbose;
    ftlaunch shows one display."""
    import ray.data

    if not verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


def use_gpu(recipe: Recipe) -> bool:
    """scaling.use_gpu resolved: auto uses GPUs when the cluster has them."""
    import ray

    if recipe.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(recipe.scaling.use_gpu)


def check_layout(recipe: Recipe, gpu: bool) -> None:
    """Refuse a worker layout the cluster can never schedule (Ray would wait forever)."""
    import ray

    resources = ray.cluster_resources()
    n = recipe.scaling.num_workers
    cpus_needed = n * recipe.scaling.cpus_per_worker
    cpus = resources.get("CPU", 0)
    if cpus_needed > cpus:
        raise LayoutError(
            f"scaling asks for {n} worker(s) x {recipe.scaling.cpus_per_worker} CPU = {cpus_needed} "
            f"CPUs but the Ray cluster has {cpus:g}; lower scaling.num_workers or "
            f"scaling.cpus_per_worker"
        )
    if gpu and n > resources.get("GPU", 0):
        raise LayoutError(
            f"scaling asks for {n} GPU worker(s) but the Ray cluster has "
            f"{resources.get('GPU', 0):g} GPUs; lower scaling.num_workers or set scaling.use_gpu: false"
        )
    if recipe.strategy.mixed_precision == "fp16" and not gpu:
        raise LayoutError("strategy.mixed_precision: fp16 needs GPUs; this run uses the CPU")


class StopFlag:
    """Set by the driver on SIGTERM; rank 0 polls it so every worker checkpoints and stops."""

    def __init__(self) -> None:
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop


class Preempted(JobFailedError):
    """The driver got SIGTERM; a checkpoint was saved when possible. Exit code 1."""


def watch_sigterm(flag, state: RunState, view: ProgressView):
    """Route SIGTERM to the workers' stop flag; returns the previous handler."""
    import signal

    def on_sigterm(signum, frame) -> None:
        state.preempted = True
        flag.set.remote()
        view.note("SIGTERM: saving a checkpoint and stopping (resume with --resume)")

    try:
        return signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: preemption is then the caller's business
        return None


def worker_env() -> dict[str, str]:
    """Environment the training workers need from the driver's (fault-injection hooks included)."""
    keep = ("FTLAUNCH_", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


# --------------------------------------------------------------------------------- stages


def drain_sink(sink, state: RunState, view: ProgressView, stop: threading.Event, tracker) -> None:
    """Move worker reports into metrics.jsonl, the progress display and the trackers."""
    path = state.run_dir / "metrics.jsonl"
    with path.open("a", encoding="utf-8") as out:
        while not (stop.is_set() and sink.empty()):
            try:
                item = sink.get(timeout=0.5)
            except Exception:  # queue.Empty from ray.util.queue
                continue
            event = item.pop("event", "metrics")
            if event == "parameters":
                state.parameters = item
                view.note(
                    f"trainable parameters: {item['trainable']:,} of {item['total']:,} "
                    f"({item['percent']:.2f}%)"
                )
            elif event == "resumed":
                state.restarts = item["restarts"]
                record = {"event": "restart", "step": item["step"], "restarts": item["restarts"]}
                out.write(json.dumps(record) + "\n")
                out.flush()
                view.note(f"restarted from the checkpoint at step {item['step']}")
            elif item.get("step", 0) <= state.last_step and state.restarts:
                # Replayed after a restart from an earlier checkpoint: already on record.
                state.replayed += 1
            else:
                if item.get("step", 0) >= 1 and "first_report" not in state.timings:
                    # From the driver's start to the first training report (steps 1..log_every).
                    state.timings["first_report"] = round(time.time() - state.started, 3)
                state.last_step = max(state.last_step, int(item.get("step", 0)))
                state.metrics.append(item)
                out.write(json.dumps(item) + "\n")
                out.flush()
                view.update(item)
                if tracker is not None:
                    tracker.log(item, int(item["step"]))


def train(
    recipe: Recipe,
    data,
    tokenizer,
    state: RunState,
    view: ProgressView,
    resume_from: Path | None,
) -> Any:
    """Stage 2: Ray Train over the prepared shards; returns Ray's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from launcher.tracking import open_tracker

    gpu = use_gpu(recipe)
    check_layout(recipe, gpu)
    try:
        plan = make_plan(data.num_rows["train"], recipe)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None
    view.start(plan.total_steps)
    sink = Queue(maxsize=10_000)
    flag = ray.remote(num_cpus=0)(StopFlag).remote()
    datasets = {"train": data.datasets["train"]}
    with_validation = "validation" in data.datasets and data.num_rows.get("validation", 0) > 0
    if with_validation:
        datasets["validation"] = data.datasets["validation"]
    ckpt = recipe.checkpoint
    metric = (
        ckpt.metric
        if (ckpt.metric and (with_validation or not ckpt.metric.startswith("eval_")))
        else None
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": recipe.model_dump(mode="json"),
            "plan": plan.__dict__,
            "sink": sink,
            "pad_token_id": tokenizer.pad_token_id,
            "has_validation": with_validation,
            "run_dir": str(state.run_dir),
            "resume_from": str(resume_from) if resume_from else None,
            "stop_flag": flag,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=recipe.scaling.num_workers,
            use_gpu=gpu,
            resources_per_worker={
                "CPU": recipe.scaling.cpus_per_worker,
                **({"GPU": 1} if gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=state.remote or str(state.run_dir),
            failure_config=ray.train.FailureConfig(max_failures=recipe.train.max_failures),
            worker_runtime_env={"env_vars": worker_env()},
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ckpt.keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=ckpt.mode,
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
    )
    tracker = open_tracker(recipe, state.run_dir)
    stop = threading.Event()
    drainer = threading.Thread(
        target=drain_sink, args=(sink, state, view, stop, tracker), daemon=True
    )
    drainer.start()
    previous = watch_sigterm(flag, state, view)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise JobError(f"training failed: {exc}") from exc
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
        stop.set()
        drainer.join(timeout=30)
        view.stop()
        if tracker is not None:
            tracker.close()
    if result.error is not None:
        raise JobError(f"training failed: {result.error}")
    if state.preempted:
        raise Preempted(
            f"stopped by SIGTERM after step {state.last_step}; continue with "
            f"--resume {state.run_dir}"
        )
    return result, plan, metric


def pick_checkpoint(result, metric: str | None, mode: str, run_dir: Path):
    """The best checkpoint by the recipe's metric, else the last one (a ray.train.Checkpoint)."""
    import ray.train

    best = getattr(result, "best_checkpoints", None) or []
    if metric and best:
        scored = [(m.get(metric), c) for c, m in best if m.get(metric) is not None]
        if scored:
            return (min if mode == "min" else max)(scored, key=lambda x: x[0])[1]
    if result.checkpoint is not None:
        return result.checkpoint
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise JobError("training produced no checkpoint to export")
    return ray.train.Checkpoint(str(latest))


def export(recipe: Recipe, checkpoint, run_dir: Path, tokenizer) -> dict[str, Any]:
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
        view.note(
            "evaluation: "
            + ", ".join(
                f"{k}={_fmt(v)}" for k, v in out["eval"].items() if isinstance(v, int | float)
            )
        )
    if recipe.generate is not None and recipe.generate.prompts:
        from launcher.batch import generate_run

        path = generate_run(recipe, run_dir)
        out["generations"] = str(path)
        view.note(f"generations written to {path}")
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of each metric over the run."""
    final: dict[str, Any] = {}
    for row in metrics:
        final.update({k: v for k, v in row.items() if k != "event"})
    return final


def data_facts(data) -> dict[str, Any]:
    """Rows and tokens per split, and how often tokenization ran (once per row, in Ray Data)."""
    return {
        "rows": data.num_rows,
        "raw_rows": data.raw_rows,
        "tokens": data.num_tokens,
        "tokenization": data.tokenization_runs(),
    }


def write_summary(
    recipe: Recipe, state: RunState, status: str, extra: dict[str, Any], plan: Plan | None
) -> dict[str, Any]:
    """Stage 5: summary.json and metrics.png."""
    from launcher import __version__
    from launcher.plots import plot_metrics

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
        "planned_steps": plan.total_steps if plan else None,
        "tokens": int(tokens),
        "tokens_per_s": (tokens / train_time) if train_time > 0 else None,
        "restarts": state.restarts,
        "replayed_reports": state.replayed,
        "timings_s": state.timings,
        "parameters": state.parameters,
        "final_metrics": final_metrics(rows),
        "strategy": recipe.strategy.name,
        "method": recipe.finetune.method,
        "num_workers": recipe.scaling.num_workers,
        **extra,
    }
    if state.notes:
        summary["notes"] = state.notes
    (state.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if rows:
        plot_metrics(rows, state.run_dir / "metrics.png", title=recipe.name)
    return summary


# ---------------------------------------------------------------------------------- driver


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
    from launcher.data import load_tables, prepare_data
    from launcher.distill import prepare_distillation
    from launcher.models import load_tokenizer

    view = view or ProgressView()
    clock = Stopwatch()
    with clock("load"):  # bad input (model path, data files, rows) fails here, before Ray starts
        tokenizer = load_tokenizer(recipe.model)
        tables = load_tables(recipe)
    with clock("ray_start"):
        ensure_ray(verbose)
        quiet_ray_data(verbose)
    view.note("preparing data (tokenizing once with Ray Data)")
    with clock("data"):
        data = prepare_data(recipe, tokenizer, tables=tables)  # 1. data
        recipe, data = prepare_distillation(recipe, data, tokenizer, view)  # teacher, offline pass
    view.note("rows: " + ", ".join(f"{k}={v:,}" for k, v in data.num_rows.items()))
    if resume is not None:
        run_dir, resume_from = Path(resume), latest_checkpoint(Path(resume))
        if resume_from is None:
            raise FileNotFoundError(
                f"--resume {resume}: no checkpoint found under {resume}/checkpoints"
            )
    else:
        (run_dir, remote), resume_from = new_run_dir(recipe), None
    state = RunState(
        run_dir, remote if resume is None else None, timings=clock.timings, started=clock.started
    )
    view.note(f"run directory: {run_dir}")
    if resume_from is not None:
        view.note(f"resuming from {resume_from}")
    plan = None
    try:
        with clock("train"):
            result, plan, metric = train(recipe, data, tokenizer, state, view, resume_from)  # 2.
        checkpoint = pick_checkpoint(result, metric, recipe.checkpoint.mode, run_dir)
        view.note(f"exporting {Path(checkpoint.path).name} to {run_dir / 'model'}")
        with clock("export"):
            exported = export(recipe, checkpoint, run_dir, tokenizer)  # 3. export
        with clock("batch"):
            batch = batch_stage(recipe, run_dir, view)  # 4. batch
            batch.update(source_metrics(recipe, data, run_dir, view))  # multi-task: per source
    except BaseException as exc:
        status = "preempted" if isinstance(exc, Preempted) else "failed"
        write_summary(recipe, state, status, {"error": str(exc), "data": data_facts(data)}, plan)
        if state.remote:
            upload_run_dir(run_dir, state.remote)
        raise
    extra = {"export": exported, **batch, "data": data_facts(data)}
    if state.remote:
        extra["storage"] = state.remote
    summary = write_summary(recipe, state, "succeeded", extra, plan)  # 5.
    if state.remote:
        upload_run_dir(run_dir, state.remote)
        view.note(f"uploaded the run directory to {state.remote}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.job RECIPE [--set k=v ...] [--resume RUN_DIR] [--verbose]`."""
    import argparse

    from launcher.cli import print_final

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
    print_final(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
