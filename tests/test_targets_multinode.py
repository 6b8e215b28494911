"""A real multi-node Ray cluster on this machine (tests/raycluster.py, fixture ray_cluster):
placement by node, a crashed node and its replacement, the environment check against real
nodes, and S3-compatible storage (moto) reached from a node.

The cluster is shared by the whole test session; a test that kills a node adds one back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner
from helpers import minimal_recipe
from raycluster import live_group_members

from launcher.cli import cli
from launcher.targets import TargetError, envcheck, ray_jobs
from launcher.targets.preflight import check_cluster


def node_ids_by_resource(cluster) -> dict[str, str]:
    """node-a / node-b -> Ray node id, from the dashboard."""
    ids = {}
    for raylet in cluster.alive_nodes():
        for name in ("node-a", "node-b"):
            if name in raylet.get("resourcesTotal", {}):
                ids[name] = raylet["nodeId"]
    return ids


def run_on(cluster, resource: str, body: str, runtime_env: dict | None = None) -> str:
    """Run `body` (a function body returning a JSON-able value) as a task needing `resource`."""
    script = textwrap.dedent(
        """
        import json, ray
        ray.init(log_to_driver=False, runtime_env={runtime_env})

        @ray.remote(num_cpus=0, resources={{{resource!r}: 0.01}})
        def task():
        {body}

        print("RESULT " + json.dumps(ray.get(task.remote(), timeout=240)))
        """
    ).format(
        runtime_env=repr(runtime_env or {}),
        resource=resource,
        body=textwrap.indent(textwrap.dedent(body), "    "),
    )
    proc = cluster.run_driver(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def test_three_nodes_each_its_own_raylet_temp_dir_and_process_group(ray_cluster):
    raylets = ray_cluster.alive_nodes()
    assert len(raylets) == 3
    totals = [r["resourcesTotal"] for r in raylets]
    assert sorted(t.get("CPU", 0) for t in totals) == [0, 3, 3]
    assert sum("node-a" in t for t in totals) == 1 and sum("node-b" in t for t in totals) == 1
    nodes = [n for n in ray_cluster.nodes if n.running]
    assert len({n.temp_dir for n in nodes}) == 3
    assert len({os.getpgid(n.proc.pid) for n in nodes}) == 3


def test_a_task_runs_on_the_node_its_resource_names(ray_cluster):
    ids = node_ids_by_resource(ray_cluster)
    for name in ("node-a", "node-b"):
        ran_on = run_on(ray_cluster, name, "return ray.get_runtime_context().get_node_id()")
        assert ran_on == ids[name]


def test_environment_check_passes_on_the_cluster(ray_cluster, client_auth, monkeypatch):
    from helpers import minimal_recipe

    cluster = ray_jobs.connect(ray_cluster.address)
    recipe = minimal_recipe(strategy={"name": "deepspeed"})
    reports = []  # the report of the check's one probe job (a job costs seconds to start)
    run_probe = envcheck.run_probe
    monkeypatch.setattr(
        envcheck, "run_probe", lambda *args: reports.append(run_probe(*args)) or reports[-1]
    )
    envcheck.check_cluster_env(cluster, recipe, ray_jobs.submit_entrypoint, {})
    (report,) = reports
    # one report per live node, each from the Python Ray runs workers with there
    assert len(report["nodes"]) == 3, report.get("nodes_error")
    assert report["driver"]["packages"]["deepspeed"] is not None


def test_environment_check_names_what_a_plain_python_lacks(ray_cluster, client_auth, tmp_path):
    """A head whose `python` is the system one: refused before any upload, rich named."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(system_python)
    from helpers import minimal_recipe

    def submit_with_plain_python(cluster, entrypoint, runtime_env, job_id, metadata):
        env = {**runtime_env, "env_vars": {"PATH": f"{bin_dir}:/usr/bin:/bin"}}
        return ray_jobs.submit_entrypoint(cluster, entrypoint, env, job_id, metadata)

    cluster = ray_jobs.connect(ray_cluster.address)
    with pytest.raises(envcheck.ClusterEnvError) as caught:
        envcheck.check_cluster_env(cluster, minimal_recipe(), submit_with_plain_python, {})
    message = str(caught.value)
    assert f"job driver (`python` on the head: {bin_dir}" in message or "python3" in message
    assert "rich: missing (needs >=13)" in message
    assert "ray: missing" in message
    assert "cluster.pip" in message and "docker/Dockerfile" in message


def test_s3_server_works_with_pyarrow_and_the_run_upload(s3_server, monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    from launcher.rundir import upload_run_dir

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "succeeded"}')
    (run / "model" / "config.json").write_text("{}")
    remote = f"s3://{s3_server.bucket}/runs/demo-1"
    upload_run_dir(run, remote)
    fs, base = pafs.FileSystem.from_uri(remote)
    listed = {
        info.path[len(base) + 1 :]
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if info.type == pafs.FileType.File
    }
    assert listed == {"summary.json", "model/config.json"}
    with fs.open_input_stream(f"{base}/summary.json") as stream:
        assert json.loads(stream.read()) == {"status": "succeeded"}


def test_a_node_writes_to_the_s3_server(ray_cluster, s3_server):
    """Storage every node reaches: a task on node-b writes, this process reads it back."""
    body = f"""
    import pyarrow.fs as pafs
    fs, base = pafs.FileSystem.from_uri("s3://{s3_server.bucket}/from-node")
    with fs.open_output_stream(base + "/hello.txt") as out:
        out.write(ray.get_runtime_context().get_node_id().encode())
    return base + "/hello.txt"
    """
    path = run_on(ray_cluster, "node-b", body, {"env_vars": s3_server.env()})
    with s3_server.filesystem().open_input_stream(path) as stream:
        assert stream.read().decode() == node_ids_by_resource(ray_cluster)["node-b"]


def test_shared_file_uri_directory_is_seen_by_every_node(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("node-a", "node-b"):
        body = f"""
        import pyarrow.fs as pafs
        fs, base = pafs.FileSystem.from_uri("file://{shared}")
        with fs.open_output_stream(base + "/{name}.txt") as out:
            out.write(b"{name}")
        return base
        """
        run_on(ray_cluster, name, body)
    assert sorted(p.name for p in shared.iterdir()) == ["node-a.txt", "node-b.txt"]


def test_local_storage_refused_on_a_cluster_of_several_nodes(ray_cluster, client_auth):
    """A local storage path is one node's disk: refused before anything is shipped."""
    cluster = ray_jobs.connect(ray_cluster.address)
    shape = ray_jobs.cluster_shape(cluster)
    assert shape.nodes >= 2
    local = minimal_recipe(scaling={"use_gpu": False})
    with pytest.raises(TargetError, match="is a local path but the Ray cluster"):
        ray_jobs.submit_to_ray(local, "name: x\n", ray_cluster.address)
    check_cluster(
        minimal_recipe(scaling={"use_gpu": False}, checkpoint={"storage_path": "s3://b/runs"}),
        shape,
        ray_cluster.address,
    )


def test_a_crashed_node_drops_out_and_a_new_one_joins(ray_cluster):
    """node-b dies (SIGKILL to its process group) and a new node-b takes its place."""
    (old,) = [n for n in ray_cluster.nodes if n.name == "node-b" and n.running]
    old_id = node_ids_by_resource(ray_cluster)["node-b"]
    ray_cluster.kill_node(old)
    assert live_group_members(old.proc.pid) == []  # nothing of the node is left running
    ray_cluster.wait_for_nodes(2)
    assert "node-b" not in node_ids_by_resource(ray_cluster)

    new = ray_cluster.replace_node(old)
    assert new.temp_dir != old.temp_dir and Path(new.temp_dir).exists()
    new_id = node_ids_by_resource(ray_cluster)["node-b"]
    assert new_id != old_id
    assert run_on(ray_cluster, "node-b", "return ray.get_runtime_context().get_node_id()") == new_id


# ------------------------------------------------------------------ a job across two nodes


def run_cli(*args: str) -> tuple[int, str, str]:
    """ftlaunch in a subprocess (its own exit code), from the repository root."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo,
        timeout=1200,
    )
    return proc.returncode, proc.stdout, proc.stderr


def train_worker_nodes(cluster, submission_id: str) -> set[str]:
    """Node ids of every Ray Train worker actor one submitted job has run (the state API; the
    session's cluster also ran other tests' jobs)."""
    job = requests.get(
        f"{cluster.address}/api/jobs/{submission_id}", headers=cluster.headers, timeout=30
    )
    job.raise_for_status()
    reply = requests.get(
        f"{cluster.address}/api/v0/actors",
        params={
            "limit": 1000,
            "detail": 1,
            "filter_keys": ["class_name", "job_id"],
            "filter_predicates": ["=", "="],
            "filter_values": ["RayTrainWorker", job.json()["job_id"]],
        },
        headers=cluster.headers,
        timeout=30,
    )
    reply.raise_for_status()
    return {actor["node_id"] for actor in reply.json()["data"]["result"]["result"]}


@pytest.mark.slow
def test_two_workers_on_two_nodes_through_ftlaunch_submit(
    ray_cluster, client_auth, tmp_path, tiny_gpt2, story_data
):
    """A two-worker job sent with `ftlaunch submit --address`, storage on a shared file:// dir.

    Each worker asks for 1 of a node's 3 CPUs, so both ranks would fit on one node:
    `scaling.placement: spread` is what puts them on two.
    """
    shared = tmp_path / "shared-runs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\n")
    body = {
        "name": "two-nodes",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {
            "train": str(story_data["train"]),
            "validation": str(story_data["validation"]),
            "max_length": 32,
        },
        "train": {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "log_every": 1},
        "scaling": {
            "num_workers": 2,
            "placement": "spread",
            "cpus_per_worker": 1,
            "use_gpu": False,
        },
        "checkpoint": {"storage_path": f"file://{shared}", "metric": None},
        "evaluate": {"metrics": ["loss"]},
        "generate": {"prompts": str(prompts), "max_new_tokens": 4},
    }
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(body))
    code, out, err = run_cli("submit", str(path), "--address", ray_cluster.address)
    assert code == 0, f"{out[-4000:]}\n{err[-3000:]}"
    job_id = re.search(r"submitted (two-nodes-\S+) to", out).group(1)

    (run_dir,) = shared.iterdir()
    for name in ("recipe.yaml", "metrics.jsonl", "model", "eval.json", "generations.jsonl"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert any((run_dir / "checkpoints").iterdir())
    placement = summary["placement"]
    assert (placement["strategy"], placement["nodes"]) == ("spread", 2)
    nodes = {r["rank"]: r["node_id"] for r in placement["ranks"]}
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1]
    assert all(r["node_ip"] for r in placement["ranks"])
    # what the workers reported is where Ray ran them
    assert set(nodes.values()) == train_worker_nodes(ray_cluster, job_id)
    assert set(nodes.values()) <= {raylet["nodeId"] for raylet in ray_cluster.alive_nodes()}

    # The job's record on the cluster: the verbs that follow a submission (in this process:
    # a fresh ftlaunch process costs seconds of imports; test_targets_ray_jobs runs them so).
    status = CliRunner().invoke(cli, ["status", job_id, "--address", ray_cluster.address])
    assert status.exit_code == 0 and status.output.startswith(f"{job_id}: SUCCEEDED"), status.output
    logs = CliRunner().invoke(cli, ["logs", job_id, "--address", ray_cluster.address])
    assert logs.exit_code == 0 and str(run_dir.name) in logs.output, logs.output[-3000:]
    info = ray_jobs.job_status(job_id, ray_cluster.address)
    assert info["metadata"]["recipe"] == "two-nodes" and "ftlaunch_version" in info["metadata"]
