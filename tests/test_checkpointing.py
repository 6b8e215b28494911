"""Checkpoints that count only when complete, uploads in the background, and preemption.

A killed worker in the middle of a checkpoint upload leaves a half-written checkpoint that resume
passes over; a node drained with a deadline (Ray's preemption notice) makes the workers
checkpoint at once, and the run continues on the other nodes from that checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import job_body, minimal_recipe, write_recipe

from launcher.checkpointing import PreemptionWatch
from launcher.cli import cli
from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import (
    STATE_FILE,
    checkpoint_complete,
    latest_checkpoint,
    rank_marker,
    read_metrics,
)
from launcher.train import uploads_async

REPO = Path(__file__).resolve().parent.parent


def fake_checkpoint(run_dir: Path, step: int, token: str | None, markers: dict[int, str]) -> Path:
    directory = run_dir / "checkpoints" / f"checkpoint_{step:06d}"
    directory.mkdir(parents=True)
    state = {"step": step, "epoch": 0, "batches_in_epoch": step}
    if token is not None:
        state.update(world_size=2, token=token)
    (directory / STATE_FILE).write_text(json.dumps(state))
    for rank, value in markers.items():
        (directory / rank_marker(rank)).write_text(value)
    return directory


def test_resume_passes_over_a_half_written_checkpoint(tmp_path):
    """Complete: every rank's marker holds the token of rank 0's state. A missing marker, or
    one left by an earlier worker group at the same step, makes it incomplete."""
    done = fake_checkpoint(tmp_path, 2, "a", {0: "a", 1: "a"})
    missing = fake_checkpoint(tmp_path, 4, "b", {0: "b"})
    stale = fake_checkpoint(tmp_path, 6, "c", {0: "c", 1: "b"})
    legacy = tmp_path / "older"
    fake_checkpoint(legacy, 8, None, {})
    assert checkpoint_complete(done)
    assert not checkpoint_complete(missing) and not checkpoint_complete(stale)
    assert latest_checkpoint(tmp_path) == done
    # without a token, a checkpoint was written whole before it got its name
    assert latest_checkpoint(legacy).name == "checkpoint_000008"
    (missing / rank_marker(1)).write_text("b")
    assert latest_checkpoint(tmp_path) == missing


def test_async_upload_defaults_to_remote_storage():
    recipe = minimal_recipe()
    assert recipe.checkpoint.async_upload == "auto"
    assert uploads_async(recipe, "s3://bucket/runs/x") and not uploads_async(recipe, None)
    forced = minimal_recipe(checkpoint={"async_upload": True})
    assert uploads_async(forced, None)
    assert not uploads_async(minimal_recipe(checkpoint={"async_upload": False}), "file:///x")


@pytest.mark.parametrize("value", ["-2", "1.5", "many"])
def test_max_preemptions_must_be_an_int_of_at_least_minus_one(value, tmp_path):
    recipe = write_recipe(
        tmp_path, {"name": "x", "model": {"name_or_path": "gpt2"}, "data": {"train": "t.jsonl"}}
    )
    result = CliRunner().invoke(
        cli, ["validate", str(recipe), "--set", f"train.max_preemptions={value}"]
    )
    assert result.exit_code == 2, result.output
    assert "train.max_preemptions" in result.output
    assert "Traceback" not in result.output


def test_preemption_is_asked_about_once_a_second_on_every_rank(monkeypatch):
    """Rank 0 times its steps and sets the interval to the next question; the others take
    rank 0's value (here: `share` returns what rank 0 would send)."""
    import ray.train

    asked = []
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: asked.append(1))
    times = [0.0, 0.01]  # one step of 10 ms between the first two questions
    monkeypatch.setattr(
        "launcher.checkpointing.time.perf_counter", lambda: times.pop(0) if times else 0.0
    )
    watch = PreemptionWatch(rank=0, share=lambda value: value)
    assert watch.check(1) is None and watch.next_step == 2
    assert watch.check(2) is None and watch.next_step == 2 + 100  # 1 s / 10 ms
    assert watch.check(50) is None and len(asked) == 2  # not asked before step 102
    follower = PreemptionWatch(rank=1, share=lambda value: 7.0)
    assert follower.check(1) is None and follower.next_step == 8


def lm_recipe(tmp_path: Path, model: Path, files: dict, checkpoint: dict, **train) -> Path:
    body = job_body(
        tmp_path,
        model,
        files,
        name="ckpt",
        train={"batch_size": 4, "lr": 3e-3, "log_every": 1, **train},
        checkpoint={"every": 2, "metric": None, "keep": None, **checkpoint},
    )
    return write_recipe(tmp_path, body)


@pytest.mark.ray_job
@pytest.mark.slow
def test_worker_killed_while_uploading_restarts_from_the_last_complete_checkpoint(
    ray_session, tiny_gpt2, story_data, tmp_path, monkeypatch
):
    """Rank 0 dies uploading checkpoint 4 in the background, after its files (the state file
    among them) and before its marker: the run restarts from checkpoint 2, not the half-written
    4, and ends with every step on record once and checkpoint 4 complete."""
    monkeypatch.setenv("FTLAUNCH_FAIL_IN_UPLOAD", "4")
    monkeypatch.setenv("FTLAUNCH_FAIL_RANK", "0")
    path = lm_recipe(
        tmp_path, tiny_gpt2, story_data, {"async_upload": True}, max_steps=6, max_failures=1
    )
    summary = run(load_recipe(path))
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "succeeded" and summary["restarts"] >= 1
    marker = (run_dir / ".ftlaunch-failure-injected").read_text()
    assert marker.startswith("rank 0 exited uploading checkpoint_000004")
    records = read_metrics(run_dir)
    restarts = [r for r in records if r.get("event") == "restart"]
    assert restarts and restarts[0]["step"] == 2  # the last complete checkpoint
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    checkpoints = run_dir / "checkpoints"
    assert checkpoint_complete(checkpoints / "checkpoint_000004")
    assert latest_checkpoint(run_dir).name == "checkpoint_000006"
