"""The per-worker training loop: the same function runs on every Ray Train worker.

Read it top to bottom: build the model through the strategy, restore a checkpoint if there is
one, then loop over this worker's shard with gradient accumulation, reporting metrics every
`log_every` steps, evaluating and checkpointing on schedule.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.checkpointing import (
    CheckpointWriter,
    PreemptionWatch,
    group_token,
    preemption_event,
    wait_for_replacement,
)
from launcher.elastic_data import epoch_batches, micro_steps_per_epoch, rows_by_id
from launcher.models import new_weights
from launcher.objectives import eval_metrics, eval_sums
from launcher.recipe import Recipe
from launcher.rundir import STATE_FILE, checkpoint_dir_name, checkpoint_step, latest_checkpoint


@dataclass
class Plan:
    """Step arithmetic from the data size and the number of workers: the driver plans for the
    most workers the recipe allows, each worker group again for its own size (`plan_at`)."""

    total_steps: int
    steps_per_epoch: int
    batches_per_epoch: int
    train_rows: int = 0
    world_size: int = 1


@dataclass
class WorkerConfig:
    """What every worker gets from the driver: built there once, pickled to each worker."""

    recipe: Recipe
    plan: Plan
    run_dir: str
    pad_token_id: int | None
    has_validation: bool
    resume_from: str | None = None
    # launcher.channel: rank 0 puts its reports and events there for the driver, and polls the
    # driver's stop flag (SIGTERM) on report steps.
    channel: Any = None
    # In-process training (Ray Train's local mode, which stores nothing): the loop writes its
    # checkpoints here itself and keeps the best `checkpoint.keep` by `score_metric`, as Ray
    # Train's CheckpointConfig does for real workers.
    checkpoints_dir: str | None = None
    score_metric: str | None = None
    # Upload checkpoints in the background (checkpoint.async_upload, resolved by the driver).
    async_upload: bool = False

    @property
    def in_process(self) -> bool:
        """Whether the loop runs in the driver's process (no Ray Train workers)."""
        return self.checkpoints_dir is not None


@dataclass
class Position:
    """Where training is: the step done last, the epoch, and batches this worker consumed in it
    (a checkpoint stores the examples all workers consumed: see `resumed_batches`)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    restarts: int = 0
    # The worker group's shape, which turns this worker's batches into examples of the epoch.
    world_size: int = 1
    batch_size: int = 1
    # The steps the lr schedule spans when counted after a change of size (0: the recipe's plan).
    total_steps: int = 0

    @property
    def examples_in_epoch(self) -> int:
        """Examples of the epoch consumed by all workers together."""
        return self.batches_in_epoch * self.batch_size * self.world_size


@dataclass
class Window:
    """Running sums between two metric reports."""

    # Sums of per-micro-step tensors stay on the device: no sync per micro-step.
    loss_sum: float | torch.Tensor = 0.0
    micro_steps: int = 0
    tokens: int | torch.Tensor = 0
    samples: int = 0
    grad_norm: float = float("nan")
    started: float = field(default_factory=time.perf_counter)
    extra: dict[str, float | torch.Tensor] = field(default_factory=dict)


def make_plan(num_train_rows: int, recipe: Recipe, world_size: int | None = None) -> Plan:
    """Optimizer steps per epoch and in total, from rows, workers, batch size and accumulation.

    Only whole accumulation windows are used: a worker's trailing micro-batches that cannot fill
    one are left out of that epoch (DeepSpeed steps only after exactly grad_accum backwards).
    `world_size` defaults to the most workers the recipe allows (the fewest rows per worker).
    """
    t = recipe.train
    workers = world_size or recipe.scaling.max_workers
    rows_per_worker = num_train_rows // workers
    available = math.ceil(rows_per_worker / t.batch_size)
    if recipe.scaling.elastic:  # whole micro-steps of one order for all (launcher.elastic_data)
        available = micro_steps_per_epoch(num_train_rows, t.batch_size, workers)
    steps_per_epoch = available // t.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"each of the {workers} worker(s) gets {rows_per_worker} training "
            f"rows = {available} batch(es) of train.batch_size={t.batch_size} per epoch, fewer "
            f"than train.grad_accum={t.grad_accum}: lower train.batch_size, train.grad_accum "
            f"or scaling.num_workers, or add data"
        )
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return Plan(
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        batches_per_epoch=steps_per_epoch * t.grad_accum,
        train_rows=num_train_rows,
        world_size=workers,
    )


def plan_at(plan: Plan, recipe: Recipe, position: Position, resized: bool) -> Plan:
    """The plan of a worker group of `position.world_size`, continuing from `position`.

    The recipe's plan at that size, unless the run changed size on the way (`resized`: now,
    or earlier when `position.total_steps` carries the span counted then). After a change the
    steps left in this epoch and the later ones are counted at the new size: a run that lost a
    worker takes more, smaller steps to finish its epochs (train.max_steps still ends it at the
    same step), and the lr schedule spans the new total from where it was.
    """
    t = recipe.train
    at = plan
    if position.world_size != plan.world_size:
        at = make_plan(plan.train_rows, recipe, position.world_size)
    if position.total_steps:
        total = position.total_steps
    elif resized:
        left = max(0, at.steps_per_epoch - position.batches_in_epoch // t.grad_accum)
        left += max(0, t.epochs - position.epoch - 1) * at.steps_per_epoch
        total = position.step + left
        if t.max_steps is not None:
            total = min(total, t.max_steps)
    else:
        return at
    return Plan(total, at.steps_per_epoch, at.batches_per_epoch, plan.train_rows, at.world_size)


def resumed_batches(examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Batches each of `world_size` workers skips to resume after `examples` consumed in the
    epoch by all workers together (at any worker count).

    Rounded down to whole optimizer steps: no example of the epoch is skipped, and at most the
    examples of one step at the new size are seen twice (besides those since the checkpoint).
    """
    per_step = batch_size * grad_accum * world_size
    return (examples // per_step) * grad_accum


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so replicated parameters start identical."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_due(every: str | int, step: int, end_of_epoch: bool) -> bool:
    """Whether an every-epoch / every-N-steps action is due now."""
    if every == "epoch":
        return end_of_epoch
    return step % int(every) == 0


def all_reduce_sum(
    values: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sum tensors across workers (a no-op on one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = {}
    for key, value in values.items():
        tensor = value.detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(tensor)
        out[key] = tensor.cpu()
    return out


def validation_metrics(
    module, shard, collate, recipe: Recipe, device: torch.device
) -> dict[str, float]:
    """Validation metrics over every worker's validation shard, reduced exactly."""
    task = recipe.model.task
    num_labels = len(recipe.model.labels or [])
    sums: dict[str, torch.Tensor] = {}
    module.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(
            batch_size=recipe.train.batch_size, collate_fn=collate, device=device
        ):
            for key, value in eval_sums(module, batch, task, num_labels).items():
                sums[key] = sums.get(key, 0) + value.to(torch.float64).cpu()
    module.train()
    if not sums:  # an empty shard still joins the reduction
        sums = {"nll": torch.zeros(()), "count": torch.zeros(())}
        if task == "classification":
            sums.update(
                correct=torch.zeros(()),
                tp=torch.zeros(num_labels),
                fp=torch.zeros(num_labels),
                fn=torch.zeros(num_labels),
            )
    reduced = all_reduce_sum({k: torch.as_tensor(v) for k, v in sums.items()}, device)
    return eval_metrics(reduced, task)


def write_checkpoint(
    strategy, position: Position, rank: int, directory: Path, stamp: dict[str, Any] | None = None
) -> None:
    """Write this rank's part of a checkpoint into `directory` (rank 0 adds `stamp` to the
    state: the world size and group token that tell a complete checkpoint)."""
    strategy.save(directory)
    # Each rank keeps its own RNG stream so dropout continues exactly after a resume.
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
        directory / f"rng_rank{rank}.pt",
    )
    if rank == 0:
        state = {
            "step": position.step,
            "epoch": position.epoch,
            "batches_in_epoch": position.batches_in_epoch,
            "restarts": position.restarts,
            # Resuming at another worker count goes by these (resumed_position, plan_at).
            "world_size": position.world_size,
            "examples_in_epoch": position.examples_in_epoch,
            "total_steps": position.total_steps,
            **(stamp or {}),
        }
        (directory / STATE_FILE).write_text(json.dumps(state))


def keep_checkpoint(strategy, position: Position, checkpoints_dir: Path) -> Path:
    """In-process: write checkpoint_<step:06d> into the run's checkpoints directory (under a
    hidden name first, so a half-written one is never taken for a checkpoint)."""
    final = checkpoints_dir / checkpoint_dir_name(position.step)
    partial = checkpoints_dir / f".{final.name}.partial"
    for stale in (partial, final):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir(parents=True)
    write_checkpoint(strategy, position, 0, partial)
    partial.rename(final)
    return final


def prune_checkpoints(
    checkpoints_dir: Path, scores: dict[int, float | None], keep: int | None, mode: str
) -> None:
    """Keep the best `keep` checkpoints by score (the newest always stays), as Ray Train's
    CheckpointConfig(num_to_keep, checkpoint_score_order) does; without scores, the newest.

    A checkpoint without a score (one from before a resume) ranks below every scored one.
    """
    if keep is None:
        return
    found = sorted(
        (checkpoint_step(state.parent), state.parent)
        for state in checkpoints_dir.glob(f"checkpoint_*/{STATE_FILE}")
    )
    if len(found) <= keep:
        return
    newest = found[-1][0]
    sign = 1.0 if mode == "max" else -1.0

    def rank(entry: tuple[int, Path]) -> tuple[bool, float, int]:
        score = scores.get(entry[0])
        if score is None or math.isnan(score):
            return (False, 0.0, entry[0])
        return (True, sign * score, entry[0])

    ranked = sorted(found, key=rank)  # worst first; equal scores: the older first
    for step, path in ranked[: len(ranked) - keep]:
        if step != newest:
            shutil.rmtree(path, ignore_errors=True)


def _checkpoint_step(checkpoint) -> int:
    with checkpoint.as_directory() as d:
        return checkpoint_step(d)


def newest_checkpoint(resume_from: str | None, run_dir: str):
    """The newest checkpoint to continue from (a ray.train.Checkpoint, or None): Ray Train's
    latest for this run, one already in the run directory (a restart can come before Ray has
    registered the last one), or the one `--resume` named."""
    import ray.train

    candidates = [c for c in (ray.train.get_checkpoint(),) if c is not None]
    on_disk = latest_checkpoint(Path(run_dir)) if Path(run_dir).exists() else None
    for path in (resume_from, on_disk):
        if path:
            candidates.append(ray.train.Checkpoint(str(path)))
    if not candidates:
        return None
    return max(candidates, key=_checkpoint_step)


def checkpoint_state(checkpoint) -> dict[str, Any]:
    """The checkpoint's STATE_FILE, read without fetching the model state."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as stream:
        return json.loads(stream.read())


def resumed_position(state: dict[str, Any], recipe: Recipe, world_size: int) -> Position:
    """Where a worker group of `world_size` continues from a checkpoint's state.

    The data position is the examples of the epoch all workers had consumed, whatever their
    number was: each new worker skips its share of them (`resumed_batches`). A checkpoint taken
    at the end of an epoch holds the next epoch with nothing consumed, so the run goes on with
    that epoch, not the one after.
    """
    t = recipe.train
    same_size = state.get("world_size", world_size) == world_size
    if "examples_in_epoch" in state:
        batches = resumed_batches(
            state["examples_in_epoch"], t.batch_size, t.grad_accum, world_size
        )
    else:  # written before examples were recorded: by a group of the same size
        batches = state["batches_in_epoch"]
    # A span counted after an earlier change holds at that size; another change recounts it.
    total = state.get("total_steps", 0) if same_size else 0
    return Position(
        step=state["step"],
        epoch=state["epoch"],
        batches_in_epoch=batches,
        restarts=state.get("restarts", 0) + 1,
        world_size=world_size,
        batch_size=t.batch_size,
        total_steps=total,
    )


def starting_point(config: WorkerConfig, world_size: int) -> tuple[Any, Position, Plan]:
    """(the checkpoint to load or None, the position, the plan) of a new worker group."""
    recipe = config.recipe
    checkpoint = newest_checkpoint(config.resume_from, config.run_dir)
    if checkpoint is None:
        position = Position(world_size=world_size, batch_size=recipe.train.batch_size)
        return None, position, plan_at(config.plan, recipe, position, resized=False)
    saved = checkpoint_state(checkpoint)
    position = resumed_position(saved, recipe, world_size)
    resized = saved.get("world_size", world_size) != world_size
    plan = plan_at(config.plan, recipe, position, resized)
    if resized:
        position.total_steps = plan.total_steps
    return checkpoint, position, plan


def load_checkpoint(strategy, checkpoint, rank: int) -> None:
    """Load the model state (resharded by the strategy) and this rank's random streams."""
    with checkpoint.as_directory() as d:
        directory = Path(d)
        strategy.load(directory)
        rng_file = directory / f"rng_rank{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])


def stop_requested(channel, rank: int, device: torch.device) -> bool:
    """Whether the driver asked to stop (SIGTERM); rank 0 asks, every rank gets the answer."""
    if channel is None:
        return False
    asked = torch.tensor(float(channel.stop_requested()) if rank == 0 else 0.0)
    return bool(all_reduce_sum({"stop": asked}, device)["stop"] > 0)


def window_metrics(window: Window, device: torch.device, world_size: int) -> dict[str, float]:
    """Mean loss and throughput over the window, summed across workers."""
    totals = all_reduce_sum(
        {
            "loss": torch.as_tensor(window.loss_sum),
            "micro": torch.tensor(float(window.micro_steps)),
            "tokens": torch.as_tensor(window.tokens, dtype=torch.float64),
            "samples": torch.tensor(float(window.samples)),
            **{k: torch.as_tensor(v) for k, v in window.extra.items()},
        },
        device,
    )
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    micro = max(float(totals["micro"]), 1.0)
    out = {
        "loss": float(totals["loss"]) / micro,
        "tokens_per_s": float(totals["tokens"]) / elapsed,
        "samples_per_s": float(totals["samples"]) / elapsed,
        "tokens": float(totals["tokens"]),
    }
    out.update({k: float(totals[k]) / micro for k in window.extra})
    return out


def worker_placement(rank: int, world_size: int) -> dict[str, Any]:
    """The Ray node this process runs on, for summary.json's `placement`."""
    import ray

    return {
        "rank": rank,
        "world_size": world_size,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
    }


def train_loop_per_worker(config: WorkerConfig) -> None:
    """One Ray Train worker: build, restore, loop, report. `config` comes from the driver."""
    from launcher.strategies import make_strategy

    run_worker(config, make_strategy)


def run_worker(
    config: WorkerConfig,
    make_strategy: Callable[[Recipe, torch.device], Any],
    writer_class: type[CheckpointWriter] = CheckpointWriter,
) -> None:
    """The worker's whole life, with the strategy made by `make_strategy` and checkpoints
    written by `writer_class` (tests wrap both)."""
    import ray.train
    import ray.train.torch

    from launcher.collate import make_collate
    from launcher.distill import build_teacher, make_adversary, make_objective
    from launcher.finetune import apply_finetune, count_parameters, load_base_model

    recipe, channel = config.recipe, config.channel
    t = recipe.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if channel is not None:  # sent first, so even a run that fails to start shows where it ran
        channel.put({"event": "placement", **worker_placement(rank, world_size)})
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, recipe.scaling.cpus_per_worker))
    seed_everything(t.seed)

    # Where to continue from, read first: the steps left (and with them the lr schedule)
    # depend on it when this group's size differs from the checkpoint's or the planned one.
    checkpoint, position, plan = starting_point(config, world_size)
    # The shards first: Ray Data starts the actor that splits each dataset when rank 0 asks
    # for its shard, and that process starts up while the model loads instead of after it.
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if config.has_validation else None

    # Model: built through the strategy (ZeRO-3 and FSDP never materialise it whole).
    strategy = make_strategy(recipe, device)
    model = strategy.build(
        lambda: apply_finetune(
            load_base_model(recipe, pad_token_id=config.pad_token_id, device=device), recipe
        )
    )
    # New weights start from random values only in a group that loads no checkpoint.
    params = {
        **count_parameters(model),
        "new_weights": [] if checkpoint is not None else new_weights(model),
    }
    if rank == 0 and channel is not None:
        channel.put({"event": "parameters", **params})
    module = strategy.prepare(model, plan.total_steps)
    # What one micro-batch costs: the task loss, or distillation from a frozen teacher (online
    # mode builds it here, sharded like the student); FGM adds an adversarial backward.
    teacher = build_teacher(recipe, strategy, device, config.pad_token_id)
    objective = make_objective(recipe, teacher)
    adversary = make_adversary(recipe, strategy.unwrapped())
    if checkpoint is not None:
        load_checkpoint(strategy, checkpoint, rank)
    if rank == 0 and channel is not None:
        if checkpoint is not None:
            channel.put({"event": "resumed", "step": position.step, "restarts": position.restarts})
        channel.put({"event": "started", "step": position.step, "world_size": world_size})

    # Ray Train workers hand checkpoints to Ray and hear of preemptions; the in-process loop
    # writes its own and has no node to lose.
    writer = watch = None
    if not config.in_process:
        writer = writer_class(rank, group_token(), config.async_upload)
        watch = PreemptionWatch(
            rank, lambda value: float(all_reduce_sum({"v": torch.tensor(value)}, device)["v"])
        )
    collate = make_collate(config.pad_token_id)
    # Elastic: every worker holds the whole split and reads its part of the epoch's one order.
    train_rows = rows_by_id(train_shard) if recipe.scaling.elastic else None
    last_eval: dict[str, float] = {}
    scores: dict[int, float | None] = {}  # in-process: step -> score_metric, for pruning
    window = Window()
    module.train()

    def report(end_of_epoch: bool, preemption=None) -> None:
        """Log, evaluate and checkpoint when due (at once before a preemption); every rank
        calls ray.train.report alike."""
        nonlocal window, last_eval
        step = position.step
        final = step >= plan.total_steps
        log_due = step % t.log_every == 0 or end_of_epoch or final
        eval_due = val_shard is not None and (is_due(t.eval_every, step, end_of_epoch) or final)
        ckpt_due = is_due(recipe.checkpoint.every, step, end_of_epoch) or final or bool(preemption)
        if not (log_due or eval_due or ckpt_due):
            return
        metrics: dict[str, float] = {
            "step": step,
            "epoch": position.epoch + position.batches_in_epoch / max(plan.batches_per_epoch, 1),
            "lr": strategy.lr(),
        }
        if window.micro_steps:
            metrics.update(window_metrics(window, device, world_size))
            metrics["grad_norm"] = window.grad_norm
        window = Window()
        if eval_due or (ckpt_due and val_shard is not None and not last_eval):
            last_eval = validation_metrics(module, val_shard, collate, recipe, device)
            metrics.update(last_eval)
        if rank == 0 and channel is not None:
            channel.put({"event": "metrics", **metrics})  # evaluations at the step they ran
        # A checkpoint is scored by the newest evaluation, however many steps ago it ran.
        scored = {**last_eval, **metrics}
        if ckpt_due and config.in_process:
            # Ray Train's local mode stores nothing: the checkpoint goes to the run directory.
            directory = Path(config.checkpoints_dir)
            keep_checkpoint(strategy, position, directory)
            scores[step] = scored.get(config.score_metric) if config.score_metric else None
            prune_checkpoints(directory, scores, recipe.checkpoint.keep, recipe.checkpoint.mode)
        elif ckpt_due:
            # Ray Train hears only of checkpoints (metrics reach the driver through the channel).
            # Every rank writes a part (its RNG state at least). The checkpoint before a
            # preemption is uploaded before training would go on: it must be stored by the
            # deadline.
            writer.report(
                scored,
                step,
                lambda d: write_checkpoint(strategy, position, rank, d, writer.stamp()),
                wait_for_upload=preemption is not None,
            )
            if preemption is not None and rank == 0 and channel is not None:
                channel.put(preemption_event(preemption, step))

    if t.eval_on_start and val_shard is not None and position.step == 0:
        last_eval = validation_metrics(module, val_shard, collate, recipe, device)
        start = {"step": 0, "epoch": 0.0, "lr": strategy.lr(), **last_eval}
        if rank == 0 and channel is not None:
            channel.put({"event": "metrics", **start})

    for epoch in range(position.epoch, t.epochs):
        if position.step >= plan.total_steps:
            break
        skip = position.batches_in_epoch if epoch == position.epoch else 0
        position.epoch, position.batches_in_epoch = epoch, skip
        if train_rows is not None:
            batches = enumerate(
                epoch_batches(
                    train_rows,
                    seed=t.seed,
                    epoch=epoch,
                    batch_size=t.batch_size,
                    world_size=world_size,
                    rank=rank,
                    start=skip,
                    pad_token_id=config.pad_token_id,
                    device=device,
                ),
                start=skip,
            )
        else:
            batches = enumerate(
                train_shard.iter_torch_batches(
                    batch_size=t.batch_size,
                    collate_fn=collate,
                    device=device,
                    local_shuffle_buffer_size=max(4 * t.batch_size, 64),
                    local_shuffle_seed=t.seed + epoch,
                )
            )
        pending = 0  # micro-batches accumulated towards the next optimizer step
        for index, batch in batches:
            if index < skip:
                continue
            last_micro = pending + 1 == t.grad_accum
            with strategy.no_sync(not last_micro):
                loss, tokens, parts = objective(module, batch)
                strategy.backward(loss)
                if adversary is not None:
                    adversary(module, batch, objective, strategy.backward)
            window.loss_sum = window.loss_sum + loss.detach().float()
            window.micro_steps += 1
            window.tokens += tokens
            for key, value in parts.items():  # e.g. task_loss and distill_loss
                window.extra[key] = window.extra.get(key, 0.0) + value
            window.samples += int(batch["input_ids"].shape[0])
            pending += 1
            position.batches_in_epoch = index + 1
            if not last_micro:
                continue
            grad_norm = strategy.step()
            window.grad_norm = float(grad_norm)
            pending = 0
            position.step += 1
            # Asked only on report steps: one driver round trip per step would cost more than
            # a tiny model's step; preemption is noticed within log_every steps.
            if position.step % t.log_every == 0 and stop_requested(config.channel, rank, device):
                plan.total_steps = position.step  # checkpoint now, then leave the loop
            end_of_epoch = position.batches_in_epoch >= plan.batches_per_epoch
            if end_of_epoch:
                position.epoch, position.batches_in_epoch = epoch + 1, 0
            preemption = watch.check(position.step) if watch is not None else None
            report(end_of_epoch, preemption)
            if preemption is not None and position.step < plan.total_steps:
                wait_for_replacement()
            if end_of_epoch or position.step >= plan.total_steps:
                break
        if pending:  # a shard shorter than planned: finish the partial accumulation
            strategy.step()
            position.step += 1
            position.epoch, position.batches_in_epoch = epoch + 1, 0
            report(True)
        elif position.batches_in_epoch and position.step < plan.total_steps:
            position.epoch, position.batches_in_epoch = epoch + 1, 0
