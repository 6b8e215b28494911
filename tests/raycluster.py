"""Real multi-node Ray clusters on this machine, for tests.

Every node is a `ray start --block` process in its own process group (its own raylet, temp dir
and ports), so a test can crash one node the way a machine dies: SIGKILL to its group. Nodes are
stopped the same way, by the process groups started here: never `ray stop` or a kill by name,
which would hit every Ray on the machine (other test sessions share it).

Token authentication is on (RAY_AUTH_MODE=token), as on a production Ray 2.60 cluster: the
clients in the tests must send the token, exactly like a user's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
# Ray sizes each node's object store from the machine's memory unless told; several nodes on
# one machine would each claim a share of /dev/shm that is never needed here.
OBJECT_STORE_BYTES = 200 * 1024 * 1024
# Ports a node's agents listen on. Defaults would collide with any other Ray on this host (an
# agent then never registers and no job can be submitted), so every one is a free port.
AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


# The HF_TOKEN the test cluster's nodes are started with: a job must see this value (passed by
# name), never the one of the shell that submitted it.
CLUSTER_HF_TOKEN = "hf_cluster_side_value_1234"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    """One `ray start --block` process group: a machine of the cluster."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 2

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class NodeExited(RuntimeError):
    """A `ray start` process ended while it should be running."""


class LocalCluster:
    """A head and any number of worker nodes, each its own raylet, all on 127.0.0.1."""

    def __init__(self, root: Path, token: str | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.token = token or secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.env = node_env(self.token, env or {})
        self.nodes: list[Node] = []

    # ------------------------------------------------------------------------- starting

    def start_head(self, num_cpus: float = 2, resources: dict[str, float] | None = None) -> Node:
        """The head: GCS, dashboard and Jobs API, plus a raylet with num_cpus CPUs."""
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            # the Ray Client server's default port (10001) is shared by every head on the host
            f"--ray-client-server-port={free_port()}",
        ]
        return self._start_alive("head", args, num_cpus, resources)

    def add_node(
        self,
        name: str | None = None,
        num_cpus: float = 2,
        resources: dict[str, float] | None = None,
        num_gpus: float = 0,
    ) -> Node:
        """A worker node joining the head; num_gpus > 0 fakes GPUs for placement tests."""
        name = name or f"worker{len(self.nodes)}"
        args = [f"--address={self.gcs_address}"]
        if num_gpus:
            args.append(f"--num-gpus={num_gpus:g}")
        return self._start_alive(name, args, num_cpus, resources)

    def replace_node(self, lost: Node) -> Node:
        """A new machine of the same kind (CPUs, resources, name) in place of a lost one."""
        return self.add_node(lost.name, num_cpus=lost.num_cpus, resources=lost.resources)

    def _start_alive(
        self,
        name: str,
        args: list[str],
        num_cpus: float,
        resources: dict[str, float] | None,
        attempts: int = 4,
    ) -> Node:
        """Start a node and wait until the cluster lists it ALIVE, retrying a failed start."""
        for attempt in range(1, attempts + 1):
            node = self._start(name, args, num_cpus, resources)
            try:
                self.wait_for_nodes(self.expected_alive(), watch=node)
                return node
            except NodeExited:
                self.nodes.remove(node)
                self.stop_node(node, grace_s=5)
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start(
        self, name: str, args: list[str], num_cpus: float, resources: dict[str, float] | None
    ) -> Node:
        temp_dir = self.root / name
        # A node added back under the same name gets a fresh temp dir, as a new machine would.
        suffix = 1
        while temp_dir.exists():
            suffix += 1
            temp_dir = self.root / f"{name}-{suffix}"
        temp_dir.mkdir(parents=True)
        resources = dict(resources or {})
        ports = {flag: free_port() for flag in AGENT_PORT_FLAGS}
        node_id = secrets.token_hex(28)
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            *args,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus:g}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in ports.items()),
        ]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        log = self.root / f"{temp_dir.name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                command,
                env={**self.env, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        threading.Thread(
            target=announce_agent_port,
            args=(proc, temp_dir, node_id, ports["dashboard-agent-listen-port"]),
            daemon=True,
        ).start()
        node = Node(name, proc, temp_dir, log, resources, num_cpus)
        self.nodes.append(node)
        return node

    # ------------------------------------------------------------------------- watching

    def expected_alive(self) -> int:
        return sum(node.running for node in self.nodes)

    def alive_nodes(self) -> list[dict]:
        """The raylets the dashboard reports ALIVE (resourcesTotal, nodeId, ...)."""
        reply = requests.get(f"{self.address}/nodes?view=summary", headers=self.headers, timeout=5)
        reply.raise_for_status()
        summary = reply.json()["data"]["summary"]
        return [n["raylet"] for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180, watch: Node | None = None) -> None:
        """Until exactly `count` raylets are ALIVE (a killed node takes a few seconds to drop).

        Raises NodeExited when the head, or the node being started (`watch`), has exited.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in {id(n): n for n in (self.nodes[0], watch) if n is not None}.values():
                if not node.running:
                    raise NodeExited(
                        f"Ray node {node.name} exited:\n{node.log.read_text()[-3000:]}"
                    )
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                if len(self.alive_nodes()) == count:
                    return
            time.sleep(0.5)
        tails = "\n".join(f"--- {n.name}\n{n.log.read_text()[-1500:]}" for n in self.nodes)
        raise TimeoutError(f"the Ray cluster did not reach {count} live node(s)\n{tails}")

    def wait_for_job_agent(self, timeout: float = 240) -> None:
        """A fresh head accepts jobs only once its job agent registered (slow on a busy host)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = requests.post(
                f"{self.address}/api/jobs/",
                json={"entrypoint": "true"},
                headers=self.headers,
                timeout=60,
            )
            if reply.ok:
                return
            time.sleep(1)
        logs = sorted(self.root.glob("head/session_*/logs/dashboard_JobHead.log"))
        tail = logs[-1].read_text()[-3000:] if logs else ""
        raise TimeoutError(f"the head's job agent never became available\n{tail}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client_env(self) -> dict[str, str]:
        """Environment for a Python process that connects to this cluster as a driver."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def run_driver(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `script` in a fresh Python connected to the cluster (ray.init() finds it)."""
        return subprocess.run(
            [sys.executable, "-c", script],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )

    def quicken_resource_view(self, tick_s: float = 1.0) -> None:
        """Make Ray's AutoscalingCoordinator look at the cluster's nodes every `tick_s`
        seconds instead of every 20 (a fixed class attribute, no setting).

        Ray Train's elastic policy counts the workers a cluster can hold from that actor's
        view, refreshed only on its tick: a node that joins is seen up to 20 s late, and a
        restart right after a node's loss still counts the dead node. The coordinator is one
        detached actor per cluster, created by the first Ray Train run with get_if_exists:
        created here first, with a shorter tick, every run on this cluster uses it.
        """
        script = f"""
import ray
from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coord
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

class QuickCoordinator(coord._AutoscalingCoordinatorActor):
    TICK_INTERVAL_S = {tick_s!r}

ray.init(log_to_driver=False)
actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuickCoordinator).options(
    name="AutoscalingCoordinator",
    namespace="AutoscalingCoordinator",
    get_if_exists=True,
    lifetime="detached",
    scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    ),
).remote()
ray.get(actor.get_reserved_resources.remote("ftlaunch-tests"), timeout=120)
tick = ray.get(actor.__ray_call__.remote(lambda self: type(self).TICK_INTERVAL_S), timeout=60)
print("TICK", tick)
"""
        proc = self.run_driver(script)
        assert proc.returncode == 0 and f"TICK {tick_s!r}" in proc.stdout, (
            proc.stdout[-2000:] + proc.stderr[-3000:]
        )

    # ------------------------------------------------------------------------- stopping

    def kill_node(self, node: Node) -> None:
        """Crash a node as a dying machine would: SIGKILL its whole process group, no goodbye."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(30)
        deadline = time.monotonic() + 10
        while live_group_members(node.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop_node(self, node: Node, grace_s: float = 60) -> None:
        """Stop a node cleanly, then make sure nothing of its group is left."""
        # SIGTERM to `ray start --block` stops the processes it started; the group kill
        # afterwards catches anything left over (only processes started here).
        if node.running:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Worker nodes first (their raylets would otherwise keep calling a dead head). The
        cluster is thrown away: a node gets a short grace, then its process group is killed."""
        for node in reversed(self.nodes):
            self.stop_node(node, grace_s=3)


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies awaiting their reaper do not)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def announce_agent_port(
    proc: subprocess.Popen, temp_dir: Path, node_id: str, port: int, timeout: float = 300
) -> None:
    """Write the dashboard agent's listen port where the node's raylet waits for it.

    A raylet gives its dashboard agent a fixed 15 s to write that file and exits when it is
    late. On a loaded 2-core machine the agent's imports alone take longer, and most node
    starts failed. The port is fixed in advance (--dashboard-agent-listen-port), so the file
    can be written as soon as the session directory exists; the agent writes the same number
    when it is up, and job submissions wait for it (wait_for_job_agent).
    """
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, persist_port

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        sessions = [p for p in temp_dir.glob("session_2*") if p.is_dir()]
        if sessions:
            persist_port(str(sessions[0]), node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME, port)
            return
        time.sleep(0.2)


# The GCS declares a killed raylet dead after about 2 s instead of about 15 s (5 failed checks,
# 3 s apart): a killed node refuses the check's connection at once, so each check fails at once.
# A raylet that is only slow (a loaded machine) still has 5 s to answer each check, 4 in a row.
QUICK_NODE_DEATH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "4",
}


def node_env(token: str, extra: dict[str, str]) -> dict[str, str]:
    """Environment of every node: token auth on, quick node-death detection, this project
    importable, this Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(QUICK_NODE_DEATH)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        # Each raylet would start one idle Python worker per CPU at once, competing with its
        # dashboard agent for the CPU during the agent's fixed startup window.
        RAY_enable_worker_prestart="0",
        PYTHONPATH=str(REPO),
        # the job's `python` must be this environment's, as on a real cluster image
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    env.update(extra)
    return env


class S3Server:
    """moto's S3 server on 127.0.0.1 (its own process group), with one bucket.

    Reached through the standard AWS variables (env()): pyarrow's S3FileSystem, Ray Train's
    storage and boto3 all honour AWS_ENDPOINT_URL, so `s3://BUCKET/...` paths work unchanged.
    """

    def __init__(self, bucket: str = "ftlaunch-test"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.proc.stderr.read().decode()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.endpoint}/moto-api/", timeout=1).ok:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("moto server did not start")
            time.sleep(0.2)
        self.filesystem().create_dir(self.bucket)

    def filesystem(self):
        """A pyarrow S3FileSystem talking to this server."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
