"""Elastic training (scaling.num_workers: [min, max]): the data position and the step plan
across a change of worker count, the driver's record of each change, and a real cluster that
loses a node and gets it back (slow)."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import pytest
from helpers import minimal_recipe

from launcher.rundir import RunState, read_metrics
from launcher.train import drain_sink, ray_worker_count, runs_in_process
from launcher.train_loop import (
    Position,
    make_plan,
    plan_at,
    resumed_batches,
    resumed_position,
)


def recipe_with(workers=(1, 2), **train):
    return minimal_recipe(
        train={"batch_size": 4, "max_failures": 3, **train},
        scaling={"num_workers": list(workers) if isinstance(workers, tuple) else workers},
    )


# ------------------------------------------------------------------------- data position


def test_resumed_batches_restore_the_examples_consumed_at_any_worker_count():
    # 2 workers x 3 batches of 4: 24 examples; one worker skips all 6 of its batches
    assert resumed_batches(24, batch_size=4, grad_accum=1, world_size=1) == 6
    # one worker consumed 5 batches (20 examples); two workers of 8 a step: 2 each, so the
    # 4 examples of the unfinished step are seen again and none is skipped
    assert resumed_batches(20, batch_size=4, grad_accum=1, world_size=2) == 2
    # whole accumulation windows only: 3 micro-batches of 4 per step and worker
    assert resumed_batches(60, batch_size=4, grad_accum=3, world_size=2) == 6
    assert resumed_batches(0, batch_size=4, grad_accum=1, world_size=3) == 0


def test_a_checkpoint_at_an_epoch_boundary_resumes_with_the_next_epoch():
    """The end of epoch 0 is stored as epoch 1 with nothing consumed: the resumed run trains
    epoch 1 (elsewhere a resume there has skipped straight to epoch 2)."""
    recipe = recipe_with(epochs=3)
    state = {"step": 10, "epoch": 1, "batches_in_epoch": 0, "world_size": 2}
    state["examples_in_epoch"] = 0
    for workers in (1, 2):
        position = resumed_position(state, recipe, workers)
        assert (position.epoch, position.batches_in_epoch, position.step) == (1, 0, 10)
        plan = make_plan(80, recipe, 2)  # 10 steps an epoch at 2 workers
        at = plan_at(plan, recipe, position, resized=workers != 2)
        # two epochs are left, at the new size: 20 steps of one worker, 10 of two
        assert at.total_steps == 10 + (20 if workers == 1 else 10) * 2


def test_resumed_position_mid_epoch_counts_examples_not_batches():
    recipe = recipe_with(epochs=1)
    saved = {"step": 3, "epoch": 0, "batches_in_epoch": 3, "world_size": 2}
    saved["examples_in_epoch"] = 24
    position = resumed_position(saved, recipe, 1)
    assert (position.batches_in_epoch, position.examples_in_epoch) == (6, 24)
    assert position.restarts == 1 and position.world_size == 1


def test_a_checkpoint_without_examples_resumes_by_its_batches():
    """Checkpoints written before the examples were recorded resume as they always did."""
    recipe = recipe_with(epochs=1)
    position = resumed_position({"step": 3, "epoch": 0, "batches_in_epoch": 3}, recipe, 2)
    assert position.batches_in_epoch == 3
    plan = make_plan(80, recipe, 2)
    assert plan_at(plan, recipe, position, resized=False) is plan


def test_plan_after_a_shrink_counts_the_steps_left_at_the_new_size():
    recipe = recipe_with(epochs=2)
    plan = make_plan(80, recipe)  # planned at the most workers: 2
    assert (plan.world_size, plan.steps_per_epoch, plan.total_steps) == (2, 10, 20)
    # step 4 of epoch 0 at two workers = 32 examples; at one worker 8 of 20 batches are done
    saved = {"step": 4, "epoch": 0, "batches_in_epoch": 4, "world_size": 2}
    saved["examples_in_epoch"] = 32
    position = resumed_position(saved, recipe, 1)
    at = plan_at(plan, recipe, position, resized=True)
    assert (at.world_size, at.steps_per_epoch, at.total_steps) == (1, 20, 4 + 12 + 20)
    # the span holds for restarts at that size (the checkpoint carries it) ...
    position.total_steps = at.total_steps
    assert plan_at(plan, recipe, position, resized=False).total_steps == 36
    # ... and train.max_steps still ends the run at the same step
    capped = recipe_with(epochs=2, max_steps=15)
    resumed = resumed_position(saved, capped, 1)
    assert plan_at(make_plan(80, capped), capped, resumed, resized=True).total_steps == 15


def test_a_fresh_elastic_start_below_the_most_workers_plans_at_its_own_size():
    recipe = recipe_with(epochs=1)
    plan = make_plan(80, recipe)
    at = plan_at(plan, recipe, Position(world_size=1, batch_size=4), resized=False)
    assert (at.world_size, at.total_steps) == (1, 20)


# ----------------------------------------------------------------------------- driver side


def test_ray_gets_a_range_only_for_elastic_runs_and_one_worker_stays_in_process(monkeypatch):
    monkeypatch.delenv("FTLAUNCH_IN_PROCESS", raising=False)
    assert ray_worker_count(recipe_with((1, 2))) == (1, 2)
    assert ray_worker_count(recipe_with((2, 2))) == 2
    assert ray_worker_count(recipe_with(3)) == 3
    one = minimal_recipe(scaling={"num_workers": 1})
    assert runs_in_process(one, gpu=False, remote=None)
    assert not runs_in_process(recipe_with((1, 2)), gpu=False, remote=None)


class QuietView:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def update(self, item) -> None:
        pass


def drain(events: list[dict], run_dir: Path) -> tuple[RunState, QuietView]:
    sink: queue.Queue = queue.Queue()
    for event in events:
        sink.put(dict(event))
    state, view, stop = RunState(run_dir), QuietView(), threading.Event()
    stop.set()  # drain what is queued, then return
    run_dir.mkdir(parents=True, exist_ok=True)
    drain_sink(sink, state, view, stop, None)
    return state, view


def test_each_step_on_record_once_and_each_change_of_size_in_the_summary(tmp_path):
    """Two workers reach step 4 (checkpoint at 2), a node is lost: one worker replays 3-4 and
    goes on; a node comes back at the checkpoint of step 6 (reported up to 7 before)."""

    def metrics(*steps):
        return [{"event": "metrics", "step": s, "loss": 1.0 / s} for s in steps]

    events = [
        {"event": "started", "step": 0, "world_size": 2},
        *metrics(1, 2, 3, 4),
        {"event": "resumed", "step": 2, "restarts": 1},
        {"event": "started", "step": 2, "world_size": 1},
        *metrics(3, 4, 5, 6, 7),
        {"event": "resumed", "step": 6, "restarts": 2},
        {"event": "started", "step": 6, "world_size": 2},
        *metrics(7, 8),
    ]
    state, view = drain(events, tmp_path / "run")
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert state.replayed == 3
    assert state.world_size_changes == [
        {"step": 2, "old": 2, "new": 1},
        {"step": 6, "old": 1, "new": 2},
    ]
    assert any("workers: 2 -> 1" in n for n in view.notes)


def test_a_restart_before_any_checkpoint_does_not_repeat_steps(tmp_path):
    events = [
        {"event": "started", "step": 0, "world_size": 2},
        *[{"event": "metrics", "step": s, "loss": 1.0} for s in (1, 2)],
        {"event": "started", "step": 0, "world_size": 1},
        *[{"event": "metrics", "step": s, "loss": 1.0} for s in (1, 2, 3)],
    ]
    state, _ = drain(events, tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    assert state.world_size_changes == [{"step": 0, "old": 2, "new": 1}]


def test_summary_lists_the_changes(tmp_path):
    from launcher.summary import write_summary

    recipe = recipe_with((1, 2))
    state = RunState(tmp_path)
    state.world_size_changes = [{"step": 2, "old": 2, "new": 1}]
    summary = write_summary(recipe, state, "succeeded", {}, planned_steps=4)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size_changes"] == on_disk["world_size_changes"]
    assert on_disk["world_size_changes"] == [{"step": 2, "old": 2, "new": 1}]
    assert on_disk["num_workers"] == [1, 2]


@pytest.mark.parametrize("workers", [(1, 2), 2])
def test_layout_check_asks_for_min_workers(workers):
    from launcher.raysession import ClusterShape, LayoutError, check_layout

    recipe = minimal_recipe(
        train={"max_failures": 1},
        scaling={"num_workers": list(workers) if isinstance(workers, tuple) else workers},
    )
    shape = ClusterShape(nodes=1, cpus=1, gpus=0)
    if workers == 2:
        with pytest.raises(LayoutError, match="asks for 2 worker"):
            check_layout(recipe, shape)
    else:
        check_layout(recipe, shape)  # starts with one worker, grows when a node joins
