"""Elastic training (scaling.num_workers: [min, max]): the data position and the step plan
across a change of worker count, the driver's record of each change, and a real cluster that
loses a node and gets it back (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import job_body, minimal_recipe, start_driver

from launcher.channel import LocalChannel
from launcher.rundir import RunState, read_metrics
from launcher.train import drain_reports, ray_worker_count, runs_in_process
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


def epoch_sequence(num_rows, batch_size, world_size, start=0, seed=0, epoch=0):
    """The examples (row positions) an epoch's micro-steps read from `start` on, rank by rank."""
    from launcher.elastic_data import epoch_order, worker_batches

    order = epoch_order(num_rows, seed, epoch)
    per_rank = [
        list(worker_batches(num_rows, batch_size, world_size, rank, start))
        for rank in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    return [
        int(i)
        for step in zip(*per_rank, strict=True)
        for first, stop in step
        for i in order[first:stop]
    ]


def test_an_epoch_reads_one_order_whatever_the_worker_count():
    one, two = epoch_sequence(40, 4, 1), epoch_sequence(40, 4, 2)
    assert one == two and sorted(one) == list(range(40))
    # 42 rows, 8 a micro-step at two workers: the last 2 of this epoch's order wait for the next
    assert len(epoch_sequence(42, 4, 2)) == 40
    assert epoch_sequence(40, 4, 2, epoch=1) != two  # each epoch its own order


def test_a_new_worker_count_continues_at_the_examples_consumed():
    """Two workers did 3 steps (24 of the epoch's examples); one worker goes on at example 24,
    and back at two workers after 7 more single steps (52 examples) at 48: nothing skipped,
    the 4 examples of the unfinished two-worker step read again."""
    full = epoch_sequence(80, 4, 2)
    start = resumed_batches(24, batch_size=4, grad_accum=1, world_size=1)
    assert epoch_sequence(80, 4, 1, start=start) == full[24:]
    start = resumed_batches(24 + 28, batch_size=4, grad_accum=1, world_size=2)
    assert epoch_sequence(80, 4, 2, start=start) == full[48:]


def test_the_rows_are_ordered_by_row_id_whatever_order_the_blocks_come_in():
    import pyarrow as pa

    from launcher.elastic_data import epoch_batches, rows_by_id

    class Shard:
        def iter_batches(self, batch_format, batch_size):
            yield pa.table({"row_id": [5, 1], "input_ids": [[5, 5], [1]], "labels": [[5, 5], [1]]})
            yield pa.table({"row_id": [3], "input_ids": [[3, 3, 3]], "labels": [[3, 3, 3]]})

    table = rows_by_id(Shard())
    assert table.column("row_id").to_pylist() == [1, 3, 5]
    common = dict(seed=0, epoch=0, batch_size=1, world_size=1, pad_token_id=0, device="cpu")
    batches = list(epoch_batches(table, rank=0, start=0, **common))
    assert sorted(int(b["row_id"][0]) for b in batches) == [1, 3, 5]
    assert batches[0]["input_ids"].dtype.is_floating_point is False


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
    channel = LocalChannel()
    for event in events:
        channel.put(dict(event))
    state, view, stop = RunState(run_dir), QuietView(), threading.Event()
    stop.set()  # drain what is queued, then return
    run_dir.mkdir(parents=True, exist_ok=True)
    drain_reports(channel, state, view, stop, None)
    return state, view


def metrics(*steps: int) -> list[dict]:
    """The training reports of these steps, as a worker group sends them."""
    return [{"event": "metrics", "step": s, "loss": 1.0 / s} for s in steps]


PARAMETERS = {"event": "parameters", "trainable": 10, "total": 40, "percent": 25.0}


def resumed_group(step: int, world_size: int, restarts: int) -> list[dict]:
    """What a worker group that resumed from the checkpoint of `step` reports as it starts."""
    return [
        PARAMETERS,
        {"event": "resumed", "step": step, "restarts": restarts},
        {"event": "started", "step": step, "world_size": world_size},
    ]


def test_each_step_on_record_once_and_each_change_of_size_in_the_summary(tmp_path):
    """Two workers reach step 4 (checkpoint at 2), a node is lost: one worker replays 3-4 and
    goes on; a node comes back at the checkpoint of step 6 (reported up to 7 before)."""
    events = [
        PARAMETERS,
        {"event": "started", "step": 0, "world_size": 2},
        *metrics(1, 2, 3, 4),
        *resumed_group(2, world_size=1, restarts=1),
        *metrics(3, 4, 5, 6, 7),
        *resumed_group(6, world_size=2, restarts=2),
        *metrics(7, 8),
    ]
    state, view = drain(events, tmp_path / "run")
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert state.replayed == 3
    resizes = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "resize"]
    assert [(r["old"], r["new"]) for r in resizes] == [(2, 1), (1, 2)]
    assert state.world_size_changes == [
        {"step": 2, "old": 2, "new": 1},
        {"step": 6, "old": 1, "new": 2},
    ]
    assert any("workers: 2 -> 1" in n for n in view.notes)
    # said once, not again by each resumed group
    assert [n for n in view.notes if n.startswith("trainable")] == [
        "trainable parameters: 10 of 40 (25.00%)"
    ]


def test_two_groups_resumed_from_one_checkpoint_are_two_restarts(tmp_path):
    """A shrunk group that saved nothing before a node joined: the grown group resumes from
    the same checkpoint (restarts 1 in it), and the run has still restarted twice."""
    events = [
        {"event": "started", "step": 0, "world_size": 2},
        *metrics(1, 2, 3),
        *resumed_group(2, world_size=1, restarts=1),
        *metrics(3),
        *resumed_group(2, world_size=2, restarts=1),
    ]
    state, _ = drain(events, tmp_path / "run")
    assert state.restarts == 2
    restarts = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "restart"]
    assert [r["restarts"] for r in restarts] == [1, 2]


def test_a_restart_before_any_checkpoint_does_not_repeat_steps(tmp_path):
    events = [
        {"event": "started", "step": 0, "world_size": 2},
        *metrics(1, 2),
        {"event": "started", "step": 0, "world_size": 1},
        *metrics(1, 2, 3),
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


# ----------------------------------------------------------- fsdp at another worker count


# ------------------------------------------------------------- a real cluster loses a node

REPO = Path(__file__).resolve().parent.parent


def wait_for(what: str, check, driver: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if driver.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def resize_to(run_dir: Path, new: int):
    """The first resize event to `new` workers in metrics.jsonl, if any."""
    for record in read_metrics(run_dir):
        if record.get("event") == "resize" and record["new"] == new:
            return record
    return None


@pytest.mark.ray_job
@pytest.mark.slow
def test_a_lost_node_shrinks_the_run_and_a_new_one_grows_it(
    ray_cluster, tiny_gpt2, story_data, tmp_path
):
    """[1, 2] fsdp workers: node-b is killed mid-run (SIGKILL to its process group), the job
    goes on with one worker from the newest checkpoint, resharded from two workers to one; a
    new node-b joins and the job grows back to two (the checkpoint resharded again), then
    finishes with every step on record once. ddp's elastic run is the same driver, data and
    checkpoint path with nothing to reshard (a worker group start is the slowest part of this
    test, so one strategy runs it)."""
    # While held, a step takes 1.5 s or more, and no worker goes past step HOLD_AT: the run
    # waits there for the cluster change however long Ray takes, and a few fast steps after
    # it finish the run. The kill comes at step 3 or 4 (two checkpoints before HOLD_AT), so
    # one worker trains a few steps of its own before the growth.
    hold_at = 8
    max_steps = hold_at + 4
    # Each worker node holds one 2-CPU worker (conftest.ray_cluster): the run's size follows the
    # number of live worker nodes.
    assert any(n.name == "node-b" and n.running for n in ray_cluster.nodes)
    body = job_body(
        tmp_path,
        tiny_gpt2,
        story_data,
        name="elastic",
        train={
            "epochs": 20,
            "max_steps": max_steps,
            "batch_size": 4,
            "lr": 3e-3,
            "log_every": 1,
            "max_failures": 4,
        },
        checkpoint={"every": 2, "metric": None, "keep": 2},
        strategy={"name": "fsdp"},
    )
    body["scaling"] = {
        "num_workers": [1, 2],
        "cpus_per_worker": 2,
        "use_gpu": False,
        "resize_interval_s": 1,
    }
    recipe_path = tmp_path / "elastic.yaml"
    recipe_path.write_text(yaml.safe_dump(body))
    hold = tmp_path / "hold"  # steps are slow while it exists: the cluster changes meanwhile
    hold.write_text("")
    log = tmp_path / "driver.log"
    env = {
        **os.environ,
        **ray_cluster.client_env(),
        "PYTHONPATH": str(REPO),
        "FTLAUNCH_SLOW_WHILE": str(hold),
        "FTLAUNCH_HOLD_AT_STEP": str(hold_at),
        # A restart right after the loss may still count the dead node (Ray's view of the
        # nodes is up to a second old): give up on such a start soon and try again. Only the
        # wait for the placement group counts, ready in about a second under load.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
    }
    with log.open("w") as out:
        driver = start_driver(recipe_path, tmp_path, env, out)
    try:
        runs = tmp_path / "runs"
        run_dir = wait_for(
            "the run directory",
            lambda: next(iter(runs.glob("elastic-*")), None) if runs.exists() else None,
            driver,
            log,
        )
        wait_for(
            "two workers past a checkpoint",
            lambda: any(r.get("step", 0) >= 3 for r in read_metrics(run_dir) if "loss" in r),
            driver,
            log,
        )
        (node_b,) = [n for n in ray_cluster.nodes if n.name == "node-b" and n.running]
        ray_cluster.kill_node(node_b)
        shrink = wait_for("the shrink to one worker", lambda: resize_to(run_dir, 1), driver, log)
        ray_cluster.replace_node(node_b)
        grow = wait_for("the growth to two workers", lambda: resize_to(run_dir, 2), driver, log)
        hold.unlink()
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait(30)
    assert driver.returncode == 0, log.read_text()[-4000:]
    # Ray's note of the lost node, restated: no `(raylet)` block on a run without --verbose
    printed = log.read_text()
    assert "was lost: Ray stopped hearing from it" in printed and "(raylet)" not in printed
    assert printed.count("trainable parameters:") == 1  # not again by each restarted group

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["world_size_changes"] == [
        {"step": shrink["step"], "old": 2, "new": 1},
        {"step": grow["step"], "old": 1, "new": 2},
    ]
    # each group continued from a checkpoint (every 2 steps), the grown one after the shrink
    assert shrink["step"] % 2 == 0
    assert grow["step"] % 2 == 0 and grow["step"] >= shrink["step"]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, max_steps + 1))
    assert summary["restarts"] >= 2
    assert (run_dir / "model" / "config.json").exists()
