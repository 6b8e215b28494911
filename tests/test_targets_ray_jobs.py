"""Target ray against the session's real Ray cluster (conftest.ray_cluster, token auth on),
plus preflight refusals.

The cluster (tests/raycluster.py) runs in its own temp dirs and process groups, on free ports,
so the in-process Ray other tests use never sees it; it is stopped by signalling the processes
it started (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import minimal_recipe, run_python
from raycluster import CLUSTER_HF_TOKEN, free_port

from launcher.cli import main
from launcher.raysession import ClusterShape
from launcher.targets import TargetError, ray_jobs
from launcher.targets.preflight import check_cluster

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ftlaunch in a subprocess (clean stdout/stderr, its own exit code)."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=900,
    )
    return proc.returncode, proc.stdout, proc.stderr


def trivial_source(tmp_path: Path, script: str) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    (source / "job_script.py").write_text(script)
    (source / ".git").mkdir()
    (source / ".git" / "big").write_text("never shipped")
    return source


# ------------------------------------------------------------------------- no cluster needed


def test_unreachable_address_exits_2_with_clear_message(capsys):
    port = free_port()
    code = main(["status", "some-job", "--address", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{port} (connection refused)" in err
    assert "Traceback" not in err


def test_submit_to_unreachable_address_is_a_target_error():
    recipe = minimal_recipe()
    with pytest.raises(TargetError, match="connection refused"):
        ray_jobs.submit_to_ray(recipe, "name: x\n", f"127.0.0.1:{free_port()}")


def test_address_resolution_order(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    assert ray_jobs.resolve_address(None) == "http://from-env:8265"
    assert ray_jobs.resolve_address("head:8265") == "http://head:8265"
    recipe = minimal_recipe(cluster={"target": "ray", "address": "http://from-recipe:8265/"})
    assert ray_jobs.resolve_address(None, recipe) == "http://from-recipe:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(TargetError, match="no Ray cluster address"):
        ray_jobs.resolve_address(None)
    with pytest.raises(TargetError, match="Ray Client address"):
        ray_jobs.resolve_address("ray://head:10001")


def test_preflight_refusals_name_the_field():
    shape = ClusterShape(nodes=1, cpus=8, gpus=2)
    with pytest.raises(TargetError, match=r"asks for 4 GPU worker\(s\).*has 2 GPU"):
        check_cluster(minimal_recipe(scaling={"num_workers": 4, "use_gpu": True}), shape, "X")
    # auto uses the GPUs the cluster has, so it needs one per worker too
    with pytest.raises(TargetError, match="GPU"):
        check_cluster(minimal_recipe(scaling={"num_workers": 3}), shape, "X")
    with pytest.raises(TargetError, match=r"3 worker\(s\) x 4 CPU = 12 CPUs"):
        check_cluster(
            minimal_recipe(scaling={"num_workers": 3, "cpus_per_worker": 4, "use_gpu": False}),
            shape,
            "X",
        )
    two_nodes = ClusterShape(nodes=2, cpus=8, gpus=2)
    with pytest.raises(TargetError, match=r"storage_path '\./runs' is a local path"):
        check_cluster(minimal_recipe(), two_nodes, "X")
    check_cluster(minimal_recipe(checkpoint={"storage_path": "s3://bucket/runs"}), two_nodes, "X")


def test_runtime_env_carries_names_not_values(tmp_path):
    recipe = minimal_recipe(
        cluster={"target": "ray", "address": "http://h:8265", "env": ["MY_KEY"]}
    )
    environ = {"HF_TOKEN": "hf_secret_value", "AWS_PROFILE": "p", "HOME": "/root", "EMPTY": ""}
    env = ray_jobs.build_runtime_env(recipe, tmp_path, environ)
    assert env["env_vars"]["HF_TOKEN"] == "${HF_TOKEN}"
    assert env["env_vars"]["AWS_PROFILE"] == "${AWS_PROFILE}"
    assert env["env_vars"]["MY_KEY"] == "${MY_KEY}"
    assert "HOME" not in env["env_vars"] and "WANDB_API_KEY" not in env["env_vars"]
    assert "hf_secret_value" not in json.dumps(env)
    assert set(ray_jobs.EXCLUDES) >= {".git", ".venv", "runs", "__pycache__"}


def test_staging_copies_code_and_recipe_without_excluded_dirs(tmp_path):
    source = trivial_source(tmp_path, "print('x')\n")
    (source / "runs").mkdir()
    (source / "runs" / "old.txt").write_text("old run")
    staged = ray_jobs.stage_working_dir("name: x\n", source, tmp_path / "stage")
    assert (staged / "job_script.py").exists()
    assert (staged / ray_jobs.RECIPE_FILE).read_text() == "name: x\n"
    assert not (staged / ".git").exists() and not (staged / "runs").exists()


# --------------------------------------------------------------------- against a real cluster


def test_token_required_and_missing_is_explained(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-such-token"))
    with pytest.raises(TargetError, match="requires token authentication and no token"):
        ray_jobs.connect(ray_cluster.address)


def test_trivial_job_status_logs_list_and_no_secret_sent(
    ray_cluster, client_auth, tmp_path, monkeypatch
):
    local_secret = "hf_LOCAL_" + secrets.token_hex(12)
    monkeypatch.setenv("HF_TOKEN", local_secret)
    script = (
        "import os\n"
        "print('hello from the job', flush=True)\n"
        "print('HF_TOKEN on the cluster:', os.environ.get('HF_TOKEN'), flush=True)\n"
        "print('recipe shipped:', os.path.exists('ftlaunch-recipe.yaml'), flush=True)\n"
        "print('git shipped:', os.path.exists('.git'), flush=True)\n"
    )
    source = trivial_source(tmp_path, script)
    recipe = minimal_recipe(cluster={"target": "ray", "address": ray_cluster.address})
    cluster = ray_jobs.connect(ray_cluster.address)
    staged = ray_jobs.stage_working_dir("name: tiny-job\n", source, tmp_path / "stage")
    runtime_env = ray_jobs.build_runtime_env(recipe, staged)
    job_id = ray_jobs.submit_entrypoint(
        cluster,
        "python job_script.py",
        runtime_env,
        ray_jobs.submission_id(recipe),
        {"recipe": "t"},
    )
    assert ray_jobs.wait_for_end(cluster, job_id, timeout_s=120) == "SUCCEEDED"

    logs = ray_jobs.job_logs(job_id, ray_cluster.address)
    assert "hello from the job" in logs
    # passed by name: the value is the cluster's own, never the submitting shell's
    assert f"HF_TOKEN on the cluster: {CLUSTER_HF_TOKEN}" in logs
    assert "recipe shipped: True" in logs and "git shipped: False" in logs

    sent = cluster.client.get_job_info(job_id).runtime_env
    assert sent["env_vars"]["HF_TOKEN"] == "${HF_TOKEN}"
    assert local_secret not in json.dumps(sent)
    for path in [*ray_cluster.root.rglob("*"), *staged.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert local_secret.encode() not in path.read_bytes(), path

    code, out, err = run_cli("status", job_id, "--address", ray_cluster.address)
    assert code == 0, err
    assert out.startswith(f"{job_id}: SUCCEEDED"), out
    code, out, _ = run_cli("logs", job_id, "--address", ray_cluster.address)
    assert code == 0 and "hello from the job" in out
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)  # honoured when --address is absent
    code, out, _ = run_cli("list")
    assert code == 0 and job_id in out and "SUCCEEDED" in out
    code, _, err = run_cli("status", "no-such-job")
    assert code == 2 and "no job 'no-such-job'" in err


def test_stop_stops_a_long_running_job(ray_cluster, client_auth, tmp_path):
    script = "import time\nprint('working', flush=True)\ntime.sleep(600)\n"
    source = trivial_source(tmp_path, script)
    recipe = minimal_recipe(name="sleeper")
    cluster = ray_jobs.connect(ray_cluster.address)
    staged = ray_jobs.stage_working_dir("name: sleeper\n", source, tmp_path / "stage")
    job_id = ray_jobs.submit_entrypoint(
        cluster,
        "python job_script.py",
        ray_jobs.build_runtime_env(recipe, staged),
        ray_jobs.submission_id(recipe),
        {},
    )
    deadline = time.monotonic() + 120
    while "working" not in ray_jobs.job_logs(job_id, ray_cluster.address):
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    code, out, err = run_cli("stop", job_id, "--address", ray_cluster.address)
    assert code == 0, err
    assert out.strip() == f"{job_id}: STOPPED"
    assert ray_jobs.job_status(job_id, ray_cluster.address)["status"] == "STOPPED"


def test_preflight_against_the_head_refuses_gpus_and_cpus(ray_cluster, client_auth):
    too_many_gpus = minimal_recipe(scaling={"num_workers": 2, "use_gpu": True})
    with pytest.raises(TargetError, match=r"asks for 2 GPU worker\(s\).*has 0 GPU"):
        ray_jobs.submit_to_ray(too_many_gpus, "name: x\n", ray_cluster.address)
    too_many_cpus = minimal_recipe(scaling={"num_workers": 7, "use_gpu": False})
    with pytest.raises(TargetError, match=r"= 7 CPUs but the Ray cluster .* has 6 CPU"):
        ray_jobs.submit_to_ray(too_many_cpus, "name: x\n", ray_cluster.address)


def test_ray_client_notes_stay_off_the_console_after_ray_configures_its_loggers():
    """Ray's client logs each package upload and the end of each log stream at INFO; importing
    Ray sets its loggers' levels again, so the quieting holds only when it comes after."""
    script = (
        "import logging\n"
        "from launcher.targets.ray_jobs import RAY_CLIENT_LOGGERS, quiet_ray_client_logs\n"
        "quiet_ray_client_logs()\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "print([logging.getLogger(n).getEffectiveLevel() for n in RAY_CLIENT_LOGGERS])\n"
    )
    done = run_python(script)
    assert done.stdout.split() == ["[30,", "30,", "30]"]
