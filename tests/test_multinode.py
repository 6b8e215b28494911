"""A real multi-node Ray cluster on this machine (tests/raycluster.py, fixture ray_cluster):
placement by node, a crashed node and its replacement, the environment check against real
nodes, and S3-compatible storage (moto) reached from a node.

The cluster is shared by the whole test session; a test that kills a node adds one back.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from launcher.targets import envcheck, ray_jobs


@pytest.fixture
def client_auth(ray_cluster, tmp_path, monkeypatch):
    """This process talks to the cluster like a user: the token in a file, no RAY_ADDRESS."""
    path = tmp_path / "auth_token"
    path.write_text(ray_cluster.token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return path


def node_ids_by_resource(cluster) -> dict[str, str]:
    """node_a / node_b -> Ray node id, from the dashboard."""
    ids = {}
    for raylet in cluster.alive_nodes():
        for name in ("node_a", "node_b"):
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
    assert sorted(t["CPU"] for t in totals) == [2, 2, 2]
    assert sum("node_a" in t for t in totals) == 1 and sum("node_b" in t for t in totals) == 1
    nodes = [n for n in ray_cluster.nodes if n.running]
    assert len({n.temp_dir for n in nodes}) == 3
    assert len({os.getpgid(n.proc.pid) for n in nodes}) == 3


def test_a_task_runs_on_the_node_its_resource_names(ray_cluster):
    ids = node_ids_by_resource(ray_cluster)
    for name in ("node_a", "node_b"):
        ran_on = run_on(ray_cluster, name, "return ray.get_runtime_context().get_node_id()")
        assert ran_on == ids[name]


def test_environment_check_passes_on_the_cluster(ray_cluster, client_auth):
    from helpers import minimal_recipe

    cluster = ray_jobs.connect(ray_cluster.address)
    recipe = minimal_recipe(strategy={"name": "deepspeed"})
    report = envcheck.run_probe(cluster, recipe, ray_jobs.submit_entrypoint)
    # one report per live node, each from the Python Ray runs workers with there
    assert len(report["nodes"]) == 3, report.get("nodes_error")
    assert report["driver"]["packages"]["deepspeed"] is not None
    envcheck.check_cluster_env(cluster, recipe, ray_jobs.submit_entrypoint, {})
    # the probe job is deleted: `ftlaunch list` shows only real jobs
    assert not [
        j for j in ray_jobs.list_jobs(ray_cluster.address) if "envcheck" in j["submission_id"]
    ]


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

    from launcher.job import upload_run_dir

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
    """Storage every node reaches: a task on node_b writes, this process reads it back."""
    body = f"""
    import pyarrow.fs as pafs
    fs, base = pafs.FileSystem.from_uri("s3://{s3_server.bucket}/from-node")
    with fs.open_output_stream(base + "/hello.txt") as out:
        out.write(ray.get_runtime_context().get_node_id().encode())
    return base + "/hello.txt"
    """
    path = run_on(ray_cluster, "node_b", body, {"env_vars": s3_server.env()})
    with s3_server.filesystem().open_input_stream(path) as stream:
        assert stream.read().decode() == node_ids_by_resource(ray_cluster)["node_b"]


def test_shared_file_uri_directory_is_seen_by_every_node(ray_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("node_a", "node_b"):
        body = f"""
        import pyarrow.fs as pafs
        fs, base = pafs.FileSystem.from_uri("file://{shared}")
        with fs.open_output_stream(base + "/{name}.txt") as out:
            out.write(b"{name}")
        return base
        """
        run_on(ray_cluster, name, body)
    assert sorted(p.name for p in shared.iterdir()) == ["node_a.txt", "node_b.txt"]


def test_a_crashed_node_drops_out_and_a_new_one_joins(ray_cluster):
    """Last: it replaces node_b (same resources, new raylet, new temp dir)."""
    (old,) = [n for n in ray_cluster.nodes if n.name == "node_b" and n.running]
    old_id = node_ids_by_resource(ray_cluster)["node_b"]
    ray_cluster.kill_node(old)
    with pytest.raises(ProcessLookupError):
        os.killpg(old.proc.pid, 0)  # nothing of the node's process group is left
    ray_cluster.wait_for_nodes(2)
    assert "node_b" not in node_ids_by_resource(ray_cluster)

    new = ray_cluster.add_node("node_b", num_cpus=2, resources={"node_b": 1})
    assert new.temp_dir != old.temp_dir and Path(new.temp_dir).exists()
    new_id = node_ids_by_resource(ray_cluster)["node_b"]
    assert new_id != old_id
    assert run_on(ray_cluster, "node_b", "return ray.get_runtime_context().get_node_id()") == new_id
