"""Stage 2, driver side: Ray Train over the prepared shards, reports into the run directory.

The workers run launcher.train_loop; this side builds their typed config, drains their reports
into metrics.jsonl, the progress display and the trackers, routes SIGTERM to a stop flag and
picks the checkpoint to export.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.channel import ActorChannel, LocalChannel
from launcher.checkpointing import CheckpointWriter
from launcher.errors import JobFailedError
from launcher.progress import ProgressView
from launcher.raysession import (
    LayoutError,
    check_layout,
    connected_shape,
    environment,
    in_process_allowed,
    wants_gpu,
    worker_env,
)
from launcher.recipe import Recipe
from launcher.rundir import (
    CHECKPOINTS_DIR,
    RunState,
    checkpoint_dir_name,
    checkpoint_step,
    checkpoints_dir,
    latest_checkpoint,
    metrics_path,
    read_metrics,
)
from launcher.train_loop import (
    Plan,
    WorkerConfig,
    make_plan,
    run_worker,
    train_loop_per_worker,
)

# Fault-injection for tests: FTLAUNCH_FAIL_AT_STEP=k makes rank FTLAUNCH_FAIL_RANK (default 1)
# exit once, right after its optimizer step k (a marker file in the run directory says so);
# FTLAUNCH_FAIL_IN_UPLOAD=k makes it exit once while uploading the checkpoint of step k, after
# its files are stored and before its completion marker.
FAIL_AT_STEP, FAIL_RANK = "FTLAUNCH_FAIL_AT_STEP", "FTLAUNCH_FAIL_RANK"
# For tests that change the cluster under a running job: while the file FTLAUNCH_SLOW_WHILE
# names exists, every optimizer step takes at least SLOW_STEP_S, and with FTLAUNCH_HOLD_AT_STEP=k
# no worker goes past step k (it waits there, its checkpoints done, until the file is gone): the
# run cannot end before the cluster change it waits for, however long that takes.
SLOW_WHILE, SLOW_STEP_S, HOLD_AT_STEP = "FTLAUNCH_SLOW_WHILE", 1.5, "FTLAUNCH_HOLD_AT_STEP"
FAIL_IN_UPLOAD = "FTLAUNCH_FAIL_IN_UPLOAD"
FAILURE_MARKER = ".ftlaunch-failure-injected"
# FSDP needs a process group, which Ray Train's local mode does not set up: an in-process run
# gets a world of one (`single_process_group`).
NEEDS_PROCESS_GROUP = ("fsdp",)
# DeepSpeed keeps module-level state that outlives a run (its communication backend, cached
# process groups, transformers' ZeRO-3 flag): it trains in a worker process of its own.
NEEDS_OWN_PROCESS = ("deepspeed",)
# scaling.placement -> the strategy of the placement group Ray Train reserves for the workers.
# SPREAD is Ray's best-effort spread: workers still share a node when there are fewer nodes.
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


class JobError(JobFailedError):
    """The job itself failed (a worker crashed, training diverged): exit code 1."""


class Preempted(JobFailedError):
    """The driver got SIGTERM or Ctrl-C; a checkpoint was saved when possible. Exit code 1."""


def watch_stop_signals(channel, state: RunState, view: ProgressView) -> dict:
    """Route SIGTERM and the first Ctrl-C to the workers' stop flag (a checkpoint at the current
    step, then a stop --resume continues); a second Ctrl-C aborts at once. Returns the handlers
    to put back, none off the main thread (stops are then the caller's business)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        if state.stopped_by and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state.stopped_by = state.stopped_by or name
        channel.request_stop()
        again = ", Ctrl-C again to abort at once" if signum == signal.SIGINT else ""
        view.note(f"{name}: saving a checkpoint and stopping (resume with --resume{again})")

    return {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def fit_on_a_thread(trainer) -> Any:
    """trainer.fit() on a thread of its own, while this (the main) thread takes signals.

    On the main thread fit() installs Ray Train's own SIGINT handler, which aborts the run with
    no checkpoint; off it, Ctrl-C reaches watch_stop_signals' handler. fit()'s exceptions are
    raised here.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ftlaunch-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)  # a timed wait: signal handlers run between waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def drain_reports(
    channel, state: RunState, view: ProgressView, stop: threading.Event, tracker
) -> None:
    """Move worker reports into metrics.jsonl, the progress display and the trackers, until
    `stop` is set and the channel is empty."""
    with metrics_path(state.run_dir).open("a", encoding="utf-8") as out:
        while True:
            finishing = stop.is_set()
            try:
                items = channel.take()
            except Exception:  # the actor is gone with its node: nothing more comes
                return
            for item in items:
                record_report(item, state, view, out, tracker)
            if finishing and not items:
                return
            if not items:
                time.sleep(REPORT_POLL_S)


# How often the driver looks for new reports: often enough for a live display.
REPORT_POLL_S = 0.2


def record_report(item: dict[str, Any], state: RunState, view: ProgressView, out, tracker) -> None:
    """One worker report: a metrics line, or an event the run directory and display record."""
    event = item.pop("event", "metrics")
    if event == "parameters":
        if state.parameters:  # each restarted worker group reports them again
            return
        state.parameters = item
        view.note(
            f"trainable parameters: {item['trainable']:,} of {item['total']:,} "
            f"({item['percent']:.2f}%)"
        )
        if item.get("new_weights"):
            view.note(describe_new_weights(item["new_weights"]))
    elif event == "placement":
        record_placement(state, item)
    elif event == "started":
        change = record_world_size(state, item)
        if change:
            out.write(json.dumps({"event": "resize", **change}) + "\n")
            out.flush()
            view.note(
                f"workers: {change['old']} -> {change['new']}, continuing after step "
                f"{change['step']}"
            )
    elif event == "preemption":
        record_preemption(state, item, out, view)
    elif event == "resumed":
        # Each resumed group is one more restart, whichever checkpoint it took: the grown group
        # of an elastic run may resume from the same checkpoint as the shrunk one did.
        state.restarts = max(state.restarts + 1, item["restarts"])
        record = {"event": "restart", "step": item["step"], "restarts": state.restarts}
        out.write(json.dumps(record) + "\n")
        out.flush()
        view.note(f"restarted from the checkpoint at step {item['step']}")
    elif item.get("step", 0) <= state.last_step and state.worker_groups > 1:
        # Replayed by a later worker group (a restart, a resize) from an earlier
        # checkpoint, or from the start: already on record.
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


def describe_new_weights(names: list[str]) -> str:
    """Said once per run: weights the checkpoint lacks (a new task head) start from random
    values, so an untrained export of them predicts nothing useful."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4:,} more" if len(names) > 4 else "")
    return (
        f"model: {len(names):,} weight(s) not in the checkpoint start from random values and "
        f"are trained by this run: {shown}"
    )


def record_world_size(state: RunState, item: dict[str, Any]) -> dict[str, int] | None:
    """Count a new worker group; a change of size is recorded (and returned) with the step the
    group continues after."""
    state.worker_groups += 1
    old, new = state.world_size, int(item["world_size"])
    state.world_size = new
    if old is None or old == new:
        return None
    change = {"step": int(item["step"]), "old": old, "new": new}
    state.world_size_changes.append(change)
    return change


def record_preemption(state: RunState, item: dict[str, Any], out, view: ProgressView) -> None:
    """A checkpoint taken because Ray announced a node's preemption: on record and on screen."""
    state.preemptions.append(item)
    out.write(json.dumps({"event": "preemption", **item}) + "\n")
    out.flush()
    deadline = item.get("deadline_ms")
    when = f" by {time.strftime('%H:%M:%S', time.localtime(deadline / 1000))}" if deadline else ""
    view.note(
        f"node {', '.join(n[:12] for n in item['nodes'])} will be preempted{when}: checkpoint "
        f"at step {item['step']}, the run continues on other nodes"
    )


def record_placement(state: RunState, item: dict[str, Any]) -> None:
    """Note the node of one rank. Every worker group (a restart, a resize) reports anew, so a
    group smaller than the last drops the ranks beyond it."""
    state.placement = {r: n for r, n in state.placement.items() if r < item["world_size"]}
    state.placement[int(item["rank"])] = {"node_id": item["node_id"], "node_ip": item["node_ip"]}


def runs_in_process(recipe: Recipe, gpu: bool, remote: str | None) -> bool:
    """Whether training runs in this process (Ray Train's local mode) instead of on a worker.

    Only where a worker would add nothing but its start-up: one CPU worker, no restarts to
    survive, local storage, and a strategy that needs no process group.
    """
    if not in_process_allowed():
        return False
    return (
        recipe.scaling.max_workers == 1
        and not gpu
        and recipe.train.max_failures == 0
        and remote is None
        and recipe.strategy.name not in NEEDS_OWN_PROCESS
    )


@contextlib.contextmanager
def single_process_group(strategy: str, in_process: bool):
    """A gloo process group of one rank around an in-process fsdp run.

    The store lives in this process (no port to pick); the group is torn down afterwards so
    the next job in the same process starts from nothing.
    """
    import torch.distributed as dist

    if not in_process or strategy not in NEEDS_PROCESS_GROUP or dist.is_initialized():
        yield
        return
    # What a launcher sets for each rank (libraries read LOCAL_RANK from the environment).
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    with environment(ranks):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            yield
        finally:
            if dist.is_initialized():  # the strategy may have ended it already
                dist.destroy_process_group()


@dataclass
class InProcessResult:
    """What trainer.fit() tells about an in-process run, read back from the run directory:
    the checkpoints the loop kept, each with the metrics reported at its step."""

    checkpoint: Any = None
    best_checkpoints: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    error: BaseException | None = None


def in_process_result(run_dir: Path) -> InProcessResult:
    """The kept checkpoints joined to metrics.jsonl by step, each with the newest evaluation
    at or before its step (as the loop scored it); the newest is `checkpoint`."""
    import ray.train

    reported: dict[int, dict[str, Any]] = {}
    newest_eval: dict[str, Any] = {}
    for record in read_metrics(run_dir):
        if record.get("event", "metrics") == "metrics" and "step" in record:
            newest_eval.update((k, v) for k, v in record.items() if k.startswith("eval_"))
            reported[int(record["step"])] = {**newest_eval, **record}
    kept = []
    for directory in sorted(checkpoints_dir(run_dir).glob("checkpoint_*")):
        try:
            kept.append((checkpoint_step(directory), directory))
        except (OSError, ValueError, KeyError):
            continue
    best = [(ray.train.Checkpoint(str(d)), reported.get(step, {})) for step, d in sorted(kept)]
    return InProcessResult(checkpoint=best[-1][0] if best else None, best_checkpoints=best)


def ray_worker_count(recipe: Recipe) -> int | tuple[int, int]:
    """What Ray Train's ScalingConfig takes: a count, or (min, max) for elastic training."""
    s = recipe.scaling
    return (s.min_workers, s.max_workers) if s.elastic else s.max_workers


def uploads_async(recipe: Recipe, remote: str | None) -> bool:
    """checkpoint.async_upload; auto: when checkpoints go to a URI, where the upload is a copy
    over the network worth overlapping with training (a local copy is quick)."""
    setting = recipe.checkpoint.async_upload
    return remote is not None if setting == "auto" else setting


def export_metric(recipe: Recipe, with_validation: bool) -> str | None:
    """The metric that picks the checkpoint to export (eval_* ones need validation data)."""
    metric = recipe.checkpoint.metric
    if metric and (with_validation or not metric.startswith("eval_")):
        return metric
    return None


def train(
    recipe: Recipe,
    data,
    tokenizer,
    state: RunState,
    view: ProgressView,
    resume_from: Path | None,
) -> tuple[Any, Plan, str | None]:
    """Run Ray Train over the prepared shards; returns (Ray's Result, the plan, export metric).

    Raises LayoutError before training when the cluster cannot hold the workers, JobError when
    training fails, Preempted after a SIGTERM.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from launcher.tracking import open_tracker

    shape = connected_shape()
    gpu = wants_gpu(recipe, shape)
    check_layout(recipe, shape)
    try:
        plan = make_plan(data.num_rows["train"], recipe)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None
    view.start(plan.total_steps)
    in_process = runs_in_process(recipe, gpu, state.remote)
    channel = report_channel(in_process)
    datasets = {"train": data.datasets["train"]}
    with_validation = "validation" in data.datasets and data.num_rows.get("validation", 0) > 0
    if with_validation:
        datasets["validation"] = data.datasets["validation"]
    ckpt = recipe.checkpoint
    metric = export_metric(recipe, with_validation)
    if in_process:
        checkpoints_dir(state.run_dir).mkdir(parents=True, exist_ok=True)
    config = WorkerConfig(
        recipe=recipe,
        plan=plan,
        run_dir=str(state.run_dir),
        pad_token_id=tokenizer.pad_token_id,
        has_validation=with_validation,
        resume_from=str(resume_from) if resume_from else None,
        channel=channel,
        checkpoints_dir=str(checkpoints_dir(state.run_dir)) if in_process else None,
        score_metric=metric,
        async_upload=uploads_async(recipe, state.remote),
    )
    trainer = TorchTrainer(
        worker_function(),
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            # 0 is Ray Train's local mode: the loop runs in this thread.
            num_workers=0 if in_process else ray_worker_count(recipe),
            elastic_resize_monitor_interval_s=recipe.scaling.resize_interval_s,
            use_gpu=gpu,
            placement_strategy=PLACEMENT_STRATEGIES[recipe.scaling.placement],
            resources_per_worker={
                "CPU": recipe.scaling.cpus_per_worker,
                **({"GPU": 1} if gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=state.remote or str(state.run_dir),
            failure_config=ray.train.FailureConfig(
                max_failures=recipe.train.max_failures,
                max_preemption_failures=recipe.train.max_preemptions,
            ),
            worker_runtime_env={"env_vars": worker_env()},
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ckpt.keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=ckpt.mode,
            ),
        ),
        datasets=datasets,
        # An elastic run's workers each read the whole training split (launcher.elastic_data).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[n for n in datasets if not (n == "train" and recipe.scaling.elastic)]
        ),
    )
    tracker = open_tracker(recipe, state.run_dir)
    stop = threading.Event()
    drainer = threading.Thread(
        target=drain_reports, args=(channel, state, view, stop, tracker), daemon=True
    )
    drainer.start()
    previous = watch_stop_signals(channel, state, view)
    threads = torch_threads()
    try:
        with single_process_group(recipe.strategy.name, in_process):
            result = fit_on_a_thread(trainer) if previous else trainer.fit()
    except Exception as exc:
        raise JobError(f"training failed: {exc}") from exc
    finally:
        import signal

        for sig, handler in previous.items():
            signal.signal(sig, handler)
        set_torch_threads(threads)  # the in-process loop sets its worker's thread count
        stop.set()
        drainer.join(timeout=30)
        view.stop()
        if tracker is not None:
            tracker.close()
        channel.close()  # no actor outlives the job's training
    if in_process:
        result = in_process_result(state.run_dir)
    if result.error is not None:
        raise JobError(f"training failed: {result.error}")
    if state.stopped_by:
        raise Preempted(
            f"stopped by {state.stopped_by} after step {state.last_step}; continue with "
            f"--resume {state.run_dir}"
        )
    return result, plan, metric


def report_channel(in_process: bool) -> LocalChannel | ActorChannel:
    """The channel the workers report into and the driver's SIGTERM stop reaches them by.

    An in-process loop shares this process and starts no actor (each costs a worker process
    start, seconds on a small machine); real workers get one actor on the driver's node.
    """
    return LocalChannel() if in_process else ActorChannel.beside(driver_node_options())


def driver_node_options() -> dict[str, Any]:
    """Actor options that keep an actor on this (the driver's) node, taking no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def pick_checkpoint(result, metric: str | None, mode: str, run_dir: Path):
    """The best checkpoint by the recipe's metric, else the last one (a ray.train.Checkpoint)."""
    import ray.train

    best = getattr(result, "best_checkpoints", None) or []
    if metric and best:
        scored = [(m[metric], m.get("step", 0), c) for c, m in best if m.get(metric) is not None]
        if scored:
            # Of checkpoints that score alike, the one trained longest.
            sign = 1 if mode == "max" else -1
            return max(scored, key=lambda x: (sign * x[0], x[1]))[2]
    if result.checkpoint is not None:
        return result.checkpoint
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise JobError("training produced no checkpoint to export")
    return ray.train.Checkpoint(str(latest))


# ----------------------------------------------------------------- fault injection (tests)


def worker_function():
    """The function every worker runs: the training loop, or with FTLAUNCH_FAIL_AT_STEP or
    FTLAUNCH_FAIL_IN_UPLOAD set, the same loop with a part that exits once (the fault-tolerance
    tests), or with FTLAUNCH_SLOW_WHILE set, one whose steps are slow while a file exists."""
    if os.environ.get(FAIL_IN_UPLOAD):
        return train_loop_failing_in_upload
    if os.environ.get(FAIL_AT_STEP):
        return train_loop_failing_once
    return train_loop_slow_while if os.environ.get(SLOW_WHILE) else train_loop_per_worker


class SlowWhile:
    """A strategy whose optimizer steps take at least SLOW_STEP_S while `hold` exists, and
    that does not start a step after step `hold_at` (when given) until `hold` is gone."""

    def __init__(self, strategy, hold: Path, hold_at: int | None = None) -> None:
        self._strategy, self._hold, self._hold_at = strategy, hold, hold_at
        self._step = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def load(self, directory: Path) -> None:
        self._strategy.load(directory)
        self._step = checkpoint_step(directory)

    def step(self) -> float:
        # Step hold_at's report and checkpoint are done when the next step gets here.
        while self._hold_at is not None and self._step >= self._hold_at and self._hold.exists():
            time.sleep(0.2)
        began = time.monotonic()
        grad_norm = self._strategy.step()
        self._step += 1
        if self._hold.exists():
            time.sleep(max(0.0, SLOW_STEP_S - (time.monotonic() - began)))
        return grad_norm


def train_loop_slow_while(config: WorkerConfig) -> None:
    """train_loop_per_worker whose steps are slow while the file FTLAUNCH_SLOW_WHILE exists."""
    from launcher.strategies import make_strategy

    hold = Path(os.environ[SLOW_WHILE])
    hold_at = int(os.environ[HOLD_AT_STEP]) if os.environ.get(HOLD_AT_STEP) else None
    run_worker(
        config, lambda recipe, device: SlowWhile(make_strategy(recipe, device), hold, hold_at)
    )


class InjectedFailure(RuntimeError):
    """The injected failure of an in-process run."""


class FailingOnce:
    """A strategy that ends its process right after optimizer step `at`, once per run."""

    def __init__(
        self, strategy, at: int, rank: int, marker: Path, in_process: bool = False
    ) -> None:
        self._strategy, self._at, self._rank, self._marker = strategy, at, rank, marker
        self._in_process = in_process
        self._step = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def load(self, directory: Path) -> None:
        self._strategy.load(directory)
        self._step = checkpoint_step(directory)

    def step(self) -> float:
        grad_norm = self._strategy.step()
        self._step += 1
        if self._step == self._at and not self._marker.exists():
            self._marker.write_text(f"rank {self._rank} exited at step {self._step}\n")
            if self._in_process:  # os._exit would end the driver itself
                raise InjectedFailure(f"rank {self._rank} failed at step {self._step}")
            os._exit(1)
        return grad_norm


def train_loop_failing_once(config: WorkerConfig) -> None:
    """train_loop_per_worker whose rank FTLAUNCH_FAIL_RANK exits after step FTLAUNCH_FAIL_AT_STEP."""
    import ray.train

    from launcher.strategies import make_strategy

    at, failing = int(os.environ[FAIL_AT_STEP]), int(os.environ.get(FAIL_RANK, "1"))
    rank = ray.train.get_context().get_world_rank()
    marker = Path(config.run_dir) / FAILURE_MARKER
    if rank != failing:
        run_worker(config, make_strategy)
        return
    run_worker(
        config,
        lambda recipe, device: FailingOnce(
            make_strategy(recipe, device), at, rank, marker, config.in_process
        ),
    )


class WriterFailingInUpload(CheckpointWriter):
    """Ends its process while uploading the checkpoint of step FTLAUNCH_FAIL_IN_UPLOAD: after
    its files are stored and before its completion marker, once per run."""

    marker: Path | None = None

    def upload(self, checkpoint, name: str):
        stored = self.store(checkpoint, name)
        at = checkpoint_dir_name(int(os.environ[FAIL_IN_UPLOAD]))
        if name == at and self.marker is not None and not self.marker.exists():
            self.marker.write_text(f"rank {self.rank} exited uploading {name}\n")
            os._exit(1)
        self.mark_complete(stored)
        return stored


def train_loop_failing_in_upload(config: WorkerConfig) -> None:
    """train_loop_per_worker whose rank FTLAUNCH_FAIL_RANK dies in a checkpoint's upload."""
    import ray.train

    from launcher.strategies import make_strategy

    failing = int(os.environ.get(FAIL_RANK, "1"))
    if ray.train.get_context().get_world_rank() != failing:
        run_worker(config, make_strategy)
        return
    WriterFailingInUpload.marker = Path(config.run_dir) / FAILURE_MARKER
    run_worker(config, make_strategy, WriterFailingInUpload)
