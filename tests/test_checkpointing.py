"""Checkpoints that count only when complete, uploads in the background, and preemption.

A killed worker in the middle of a checkpoint upload leaves a half-written checkpoint that resume
passes over; a node drained with a deadline (Ray's preemption notice) makes the workers
checkpoint at once, and the run continues on the other nodes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from helpers import job_body, lm_job_recipe, minimal_recipe, start_driver, write_recipe

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
    return lm_job_recipe(tmp_path, model, files, name="ckpt", checkpoint=checkpoint, **train)


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
    assert (run_dir / "model" / "config.json").exists()


def alive_train_worker_nodes(cluster) -> set[str]:
    """Node ids of the Ray Train worker actors alive now (the state API)."""
    reply = requests.get(
        f"{cluster.address}/api/v0/actors",
        params={
            "limit": 1000,
            "filter_keys": ["class_name", "state"],
            "filter_predicates": ["=", "="],
            "filter_values": ["RayTrainWorker", "ALIVE"],
        },
        headers=cluster.headers,
        timeout=30,
    )
    reply.raise_for_status()
    return {actor["node_id"] for actor in reply.json()["data"]["result"]["result"]}


def drain(cluster, node_id: str, deadline_s: int) -> None:
    """What a cloud's preemption notice does to a Ray node: drain it with a deadline."""
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "drain-node",
        f"--address={cluster.gcs_address}",
        f"--node-id={node_id}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=spot instance reclaimed (test)",
        f"--deadline-remaining-seconds={deadline_s}",
    ]
    proc = subprocess.run(
        command, env=cluster.client_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.ray_job
@pytest.mark.slow
def test_a_drained_node_gets_a_checkpoint_before_its_deadline_and_the_run_moves_on(
    ray_cluster, tiny_gpt2, story_data, tmp_path
):
    """Two workers spread over the cluster; the worker node of one is drained with an 8 s
    deadline and killed at the deadline. The workers checkpoint at once, Ray Train restarts
    them on the nodes left from that checkpoint, and the run completes: no step is lost
    beyond that checkpoint and every step is on record once. Steps are slow until the restart
    (the cluster changes meanwhile), fast after it."""
    max_steps = 60
    body = job_body(
        tmp_path,
        tiny_gpt2,
        story_data,
        name="preempt",
        train={"batch_size": 4, "lr": 3e-3, "log_every": 5, "epochs": 50, "max_steps": max_steps},
        checkpoint={"every": 100, "metric": None, "keep": None},
    )
    body["scaling"].update(placement="spread", cpus_per_worker=1, use_gpu=False)
    path = write_recipe(tmp_path, body)
    hold = tmp_path / "hold"
    hold.write_text("")
    env = {
        **ray_cluster.client_env(),
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        "FTLAUNCH_SLOW_WHILE": str(hold),
    }
    driver = start_driver(path, tmp_path, env)
    names = {}
    for raylet in ray_cluster.alive_nodes():
        for name in ("node-a", "node-b"):
            if name in raylet.get("resourcesTotal", {}):
                names[raylet["nodeId"]] = name
    victim = None
    try:
        runs = tmp_path / "runs"
        deadline = time.time() + 420
        while time.time() < deadline and driver.poll() is None and victim is None:
            dirs = list(runs.glob("preempt-*")) if runs.exists() else []
            if dirs and any(r.get("step", 0) >= 5 for r in read_metrics(dirs[0])):
                on = sorted(alive_train_worker_nodes(ray_cluster) & set(names))
                if on:
                    victim_id = on[0]
                    victim = next(n for n in ray_cluster.nodes if n.name == names[victim_id])
            time.sleep(0.3)
        if victim is None:
            driver.kill()
            pytest.fail(f"training never reached step 5 on a worker node:\n{driver.stdout.read()}")
        drain(ray_cluster, victim_id, deadline_s=8)
        time.sleep(9)
        ray_cluster.kill_node(victim)  # the cloud takes the machine after the deadline
        run_dir = next(runs.glob("preempt-*"))
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            if any(r.get("event") == "restart" for r in read_metrics(run_dir)):
                break
            time.sleep(0.3)
        hold.unlink()
        output, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        if victim is not None:
            ray_cluster.wait_for_nodes(ray_cluster.expected_alive())
            ray_cluster.replace_node(victim)
    assert driver.returncode == 0, output[-4000:]
    run_dir = next(runs.glob("preempt-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == max_steps
    (preemption,) = summary["preemptions"]
    assert preemption["nodes"] == [victim_id] and preemption["deadline_ms"]
    saved = preemption["step"]
    assert 5 <= saved < max_steps
    assert checkpoint_complete(run_dir / "checkpoints" / f"checkpoint_{saved:06d}")
    records = read_metrics(run_dir)
    restarts = [r for r in records if r.get("event") == "restart"]
    assert [r["step"] for r in restarts] == [saved]  # resumed from the preemption checkpoint
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps
    assert summary["replayed_reports"] == 0  # nothing trained after the checkpoint was lost
    assert "will be preempted" in output
