"""SIGTERM checkpoints and --resume continues. A worker killed mid-run restarts from the last
complete checkpoint: test_checkpointing (killed while uploading a checkpoint, the harder case of
the same restart)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import lm_job_recipe, start_driver

from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import latest_checkpoint, read_metrics

REPO = Path(__file__).resolve().parent.parent


def lm_recipe(tmp_path: Path, model: Path, files: dict, **train) -> Path:
    """One worker: stops are the driver's and the loop's business, the same for any worker
    count (two-worker jobs are covered elsewhere)."""
    return lm_job_recipe(tmp_path, model, files, name="faults", workers=1, **train)


@pytest.mark.ray_job
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_checkpoints_and_resume_continues(
    ray_session, tiny_gpt2, story_data, tmp_path, stop
):
    recipe_path = lm_recipe(tmp_path, tiny_gpt2, story_data, max_steps=400)
    # The driver joins the session's Ray instance, as a driver joins a running cluster.
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    driver = start_driver(recipe_path, tmp_path, env)
    runs = tmp_path / "runs"
    deadline = time.time() + 240
    reached = False
    while time.time() < deadline and driver.poll() is None:
        dirs = list(runs.glob("faults-*")) if runs.exists() else []
        if dirs and any(r.get("step", 0) >= 3 for r in read_metrics(dirs[0])):
            reached = True
            break
        time.sleep(0.5)
    assert reached, "the driver never reached step 3"
    driver.send_signal(stop)
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 1, output
    name = stop.name
    assert f"{name}: saving a checkpoint and stopping" in output
    assert f"stopped by {name} after step" in output and "--resume" in output
    run_dir = next(runs.glob("faults-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted"
    saved = json.loads((latest_checkpoint(run_dir) / "ftlaunch_state.json").read_text())["step"]
    last_reported = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert saved == last_reported >= 3  # the checkpoint was taken at the stop, not an older one

    resumed = load_recipe(recipe_path, [f"train.max_steps={saved + 2}"])
    summary = run(resumed, resume=run_dir)
    assert summary["status"] == "succeeded"
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[-2:] == [saved + 1, saved + 2]
