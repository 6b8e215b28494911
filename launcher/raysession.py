"""The Ray session a job runs in: connecting, its environment, and what the cluster can hold."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.errors import BadInputError, JobFailedError

# FTLAUNCH_IN_PROCESS=0 keeps the small CPU work ftlaunch otherwise does in the driver on Ray:
# one-worker training on a Ray Train worker, tokenization on Ray Data tasks, batch jobs and the
# offline teacher pass on actor pools.
IN_PROCESS = "FTLAUNCH_IN_PROCESS"


def in_process_allowed() -> bool:
    """Whether small CPU work may run in the driver (FTLAUNCH_IN_PROCESS is not 0)."""
    return os.environ.get(IN_PROCESS, "1") != "0"


if TYPE_CHECKING:  # for annotations only: the recipe is a layer-1 neighbour, not a dependency
    from launcher.recipe import Recipe


class RayStartError(JobFailedError):
    """The embedded Ray did not come up, or the named cluster could not be joined: exit 1."""


class LayoutError(BadInputError):
    """A resource layout that cannot make progress on this cluster: exit code 2."""


@dataclass(frozen=True)
class ClusterShape:
    """What a running Ray cluster offers: live nodes and their total resources."""

    nodes: int
    cpus: float
    gpus: float


def ensure_ray(verbose: bool = False, address: str | None = None) -> None:
    """Connect to `address` (else RAY_ADDRESS when set), else start an embedded Ray on this
    machine; nothing to do when this process is already connected."""
    import ray

    quiet_libraries(verbose)
    if ray.is_initialized():
        return
    warming = import_in_background(WARM_IMPORTS)
    try:
        _start_or_join(address or os.environ.get("RAY_ADDRESS"), verbose)
    finally:
        if warming is not None:
            warming.join()
    if not verbose:
        restate_cluster_errors()


# What every stage imports once Ray is up (torch 1.9 s, transformers' model code 4.4 s on a
# 2-core machine): imported on a thread while ray.init waits for the node's processes to come
# up, which leaves this process mostly idle. Neither is imported by ray.init itself.
WARM_IMPORTS = ("torch", "transformers.modeling_utils")


def import_in_background(names: tuple[str, ...]) -> threading.Thread | None:
    """Import the modules of `names` not yet imported, on a thread of their own."""
    missing = [name for name in names if name not in sys.modules]
    if not missing:
        return None

    def load() -> None:
        for name in missing:
            # A module that fails to import here fails again where it is needed, and is
            # reported there.
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="ftlaunch-imports", daemon=True)
    thread.start()
    return thread


def _start_or_join(joining: str | None, verbose: bool) -> None:
    """ray.init: join the cluster at `joining`, or start Ray here when it is None."""
    import ray

    # Ray gives a new local node 30 s to register, a wait a busy machine can overrun: one more
    # try before giving up. A cluster that cannot be joined is not retried.
    env = ray_job_env(embedded=not joining)
    for _ in range(1 if joining else EMBEDDED_START_TRIES):
        try:
            # A joined cluster gets the environment with the job; the Ray started here has it
            # from the start (its processes inherit it, and every worker they start: the same
            # variables a job runtime_env would carry, without its cost; see environment()).
            # "local": a new Ray even when a `ray start` cluster runs on this machine, which
            # ray.init would join without the environment (joining one is RAY_ADDRESS=auto).
            with environment({} if joining else env):
                ray.init(
                    address=joining or "local",
                    log_to_driver=verbose,
                    logging_level="INFO" if verbose else "WARNING",
                    include_dashboard=False if not joining else None,
                    runtime_env={"env_vars": env} if joining else None,
                )
            return
        except Exception as exc:  # Ray raises bare Exception / ConnectionError here
            ray.shutdown()  # ends whatever part of the node did start
            failure = exc
    if joining:
        raise RayStartError(f"could not join the Ray cluster at {joining}: {failure}")
    raise RayStartError(
        f"could not start Ray on this machine ({EMBEDDED_START_TRIES} tries): {failure}. "
        "A machine this busy also slows training: retry when it is quieter, or start Ray "
        "yourself (`ray start --head`) and pass --address / RAY_ADDRESS."
    )


EMBEDDED_START_TRIES = 2


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process's environment for the block, then as it was.

    A Ray node started in the block passes it to its processes. Ray starts a worker of a job
    with a runtime_env through a setup process that imports Ray and then execs the worker,
    which imports it again: 1.6 s of CPU per task or actor process on a 2-core machine instead
    of 0.75 s. Actors that bring a runtime_env of their own (Ray Train's controller and
    everything it starts) pay it either way.
    """
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# The GCS's words when it gives up on a node, as Ray 2.60 publishes them to every driver.
_NODE_DEAD = re.compile(
    r"node id: (?P<id>[0-9a-f]+) and address: (?P<address>\S+)"
    r"(?: and node name: \S+)? has been marked dead"
)


def restate_cluster_errors() -> None:
    """Errors the cluster publishes to this driver reach the terminal in ftlaunch's words.

    Ray's driver prints every such error (a node marked dead, a worker killed for memory, a task
    no node can run) as a `(raylet)` block of several lines, log_to_driver or not. Each becomes
    one line here; --verbose leaves Ray's own text (ensure_ray does not call this then).
    """
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "restates", False):
        return

    def restated(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for message in data.get("lines", []):
            print(f"cluster: {restate_cluster_error(message)}", file=sys.stderr, flush=True)

    restated.restates = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = restated


def restate_cluster_error(message: str) -> str:
    """One line for an error Ray published to the driver."""
    lost = _NODE_DEAD.search(message)
    if lost:
        return (
            f"node {lost['id'][:12]} ({lost['address']}) was lost: Ray stopped hearing from it "
            "(the machine went away, or its raylet crashed or stalled)"
        )
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if len(first) > 240:
        first = first[:239] + "…"
    return f"{first} (--verbose shows Ray's full message)"


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


# Loggers whose warnings say nothing a person running ftlaunch can act on: Ray's note that the
# embedded cluster it starts uses token authentication, DeepSpeed's "Setting accelerator to
# CPU" on every import on a CPU machine, and bitsandbytes' note on CPUs with AVX512-BF16 that
# an optional kernel package is missing (logged whenever peft is imported, LoRA runs included).
CHATTY_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "DeepSpeed",
    "bitsandbytes.backends.cpu.ops",
)


# Deprecation notices the libraries give about their own internals (peft reading transformers'
# `is_gradient_checkpointing` on every LoRA run, say): nothing a person running ftlaunch changes.
LIBRARY_DEPRECATIONS = r"(transformers|peft|accelerate|deepspeed|torch)(\.|$)"


def quiet_libraries(verbose: bool) -> None:
    """Without --verbose, only errors from CHATTY_LOGGERS reach the terminal, and no library
    deprecation notice (LIBRARY_DEPRECATIONS).

    A filter rather than a level: DeepSpeed sets its logger's level when it is imported.
    """
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, _BelowError)]:
            logger.removeFilter(existing)
        if not verbose:
            logger.addFilter(_BelowError())
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings(
            "default" if verbose else "ignore", category=category, module=LIBRARY_DEPRECATIONS
        )


def quiet_transformers(verbose: bool) -> None:
    """transformers' progress bars and load reports only with --verbose."""
    if not verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def ray_job_env(embedded: bool = False) -> dict[str, str]:
    """Environment for every process of the Ray job (controller, workers, data tasks);
    `embedded` for the one-node Ray that ftlaunch starts on this machine.

    Ray Train's controller drains each worker's one-slot report queue only when it polls, every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a report made before the previous one
    was drained blocks the worker until then. Workers report to Ray Train only with checkpoints
    (metrics go through the driver's report channel), so that is rare; polling every second
    bounds it and notices a finished or failed worker sooner. Each poll also takes the worker's
    GIL away from the training thread for a moment: polling every 0.2 s cost a tiny model ~8% of its
    throughput (bench/README.md).
    """
    env = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0"
        ),
        # Ray Train's preemption watcher reads the cluster's drain state this often (5 s by
        # default): a drain deadline is often 30 s to 2 minutes away, and the checkpoint before
        # it should start soon. One GCS call a second from one actor is cheap.
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1.0"
        ),
        # Ray Train starts a preemption watcher (one more process, seconds of start-up on a
        # small machine) for every worker group. Nothing drains the one node of an embedded Ray,
        # and there would be nowhere to move to: it runs only on clusters joined by address.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get(
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0" if embedded else ""
        ),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", ""),
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    }
    return {k: v for k, v in env.items() if v}


def worker_env() -> dict[str, str]:
    """Environment the training workers need from the driver's (fault-injection hooks included)."""
    keep = ("FTLAUNCH_", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's and transformers' own progress bars and load reports only with --verbose;
    ftlaunch shows one display."""
    import ray.data

    quiet_transformers(verbose)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        # Ray Data's per-run INFO lines and its progress-bar notice would interleave with ours.
        levels = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
        for name, level in levels.items():
            logger = logging.getLogger(name)
            logger.setLevel(max(level, logger.getEffectiveLevel()))


def connected_shape() -> ClusterShape:
    """The shape of the Ray cluster this process is connected to."""
    import ray

    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterShape(nodes=nodes, cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))


def wants_gpu(recipe: Recipe, shape: ClusterShape) -> bool:
    """scaling.use_gpu resolved against a cluster: auto uses GPUs when it has them."""
    if recipe.scaling.use_gpu == "auto":
        return shape.gpus > 0
    return bool(recipe.scaling.use_gpu)


def use_gpu(recipe: Recipe) -> bool:
    """scaling.use_gpu resolved against the connected cluster."""
    return wants_gpu(recipe, connected_shape())


def check_layout(recipe: Recipe, shape: ClusterShape, cluster: str = "the Ray cluster") -> None:
    """Refuse a worker layout the cluster can never schedule (Ray would wait forever).

    `cluster` names it in the message (e.g. "the Ray cluster at http://head:8265").
    """
    s = recipe.scaling
    gpu = wants_gpu(recipe, shape)
    where = f"{cluster} has {{}} on {shape.nodes} node(s)"
    # An elastic run starts with what the cluster gives, but never with fewer than min.
    workers = s.min_workers
    asked = f"at least {workers}" if s.elastic else str(workers)
    if gpu and workers > shape.gpus:
        raise LayoutError(
            f"scaling asks for {asked} GPU worker(s) (scaling.num_workers: "
            f"{list(s.num_workers) if s.elastic else workers}, scaling.use_gpu: "
            f"{str(s.use_gpu).lower()}) but "
            + where.format(f"{shape.gpus:g} GPU(s)")
            + "; lower scaling.num_workers, set scaling.use_gpu: false, or add GPU nodes"
        )
    cpus = workers * s.cpus_per_worker
    if cpus > shape.cpus:
        raise LayoutError(
            f"scaling asks for {asked} worker(s) x {s.cpus_per_worker} CPU = {cpus} CPUs "
            "but "
            + where.format(f"{shape.cpus:g} CPU(s)")
            + "; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if recipe.strategy.mixed_precision == "fp16" and not gpu:
        raise LayoutError("strategy.mixed_precision: fp16 needs GPUs; this run uses the CPU")
