"""Target ray: run the driver on an existing Ray cluster through the Ray Jobs API.

The job's working directory is a staged copy of the submitting directory (the project code and
anything the recipe points at by relative path) plus the resolved recipe; the entrypoint is
`python -m launcher.job ftlaunch-recipe.yaml`. Credentials travel by name only (see
launcher.targets). Clusters that use Ray's token authentication get the token from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, sent only when the cluster asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import launcher
from launcher import __version__
from launcher.errors import JobFailedError
from launcher.raysession import ClusterShape
from launcher.recipe import Recipe
from launcher.rundir import is_uri, run_name
from launcher.targets import TargetError, env_names_set_here
from launcher.targets.envcheck import check_cluster_env
from launcher.targets.preflight import check_cluster

RECIPE_FILE = "ftlaunch-recipe.yaml"
DEFAULT_PORT = 8265
# Never shipped: version control, environments, outputs and caches.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    ".mypy_cache",
    ".cache",
    "*.egg-info",
    "node_modules",
    "wandb",
    "mlruns",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray refuses packages above its gRPC message limit; say so before zipping gigabytes.
MAX_WORKING_DIR_BYTES = 500 * 1024 * 1024
AGENT_WAIT_S = 120.0


# ------------------------------------------------------------------------------- address


def resolve_address(address: str | None, recipe: Recipe | None = None) -> str:
    """--address, else cluster.address, else RAY_ADDRESS; normalized to http(s)://host:port."""
    chosen = (
        address or (recipe.cluster.address if recipe else None) or os.environ.get("RAY_ADDRESS")
    )
    if not chosen:
        raise TargetError(
            "no Ray cluster address: pass --address http://HEAD:8265, set cluster.address "
            "with cluster.target: ray, or export RAY_ADDRESS"
        )
    chosen = chosen.strip().rstrip("/")
    if chosen.startswith("ray://"):
        raise TargetError(
            f"{chosen} is a Ray Client address; ftlaunch talks to the Jobs API on the "
            f"dashboard port: use http://HEAD:{DEFAULT_PORT}"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    return chosen


# ------------------------------------------------------------------------------ auth token


def local_auth_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token this machine has: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else None
    path = path or Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None


def auth_headers(address: str) -> dict[str, str]:
    """Headers the cluster needs: none, or the bearer token when it answers 401.

    Also the reachability check: a refused connection becomes a TargetError saying so.
    """
    import requests

    try:
        reply = requests.get(f"{address}/api/version", timeout=15)
    except requests.exceptions.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
        raise TargetError(
            f"cannot reach the Ray cluster at {address} ({reason}); check the address "
            f"(the dashboard port, {DEFAULT_PORT} by default) and that the cluster is up "
            f"(`ray status` on the head node)"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise TargetError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    if reply.status_code == 401:
        token = local_auth_token()
        if token is None:
            raise TargetError(
                f"the Ray cluster at {address} requires token authentication and no token "
                f"was found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, "
                f"or put it in ~/.ray/auth_token (on the head: `ray get-auth-token`)"
            )
        return {"Authorization": f"Bearer {token}"}
    if reply.status_code != 200:
        raise TargetError(
            f"{address} does not look like a Ray dashboard: GET /api/version answered "
            f"{reply.status_code}; check the address and port ({DEFAULT_PORT} by default)"
        )
    return {}


# --------------------------------------------------------------------------------- client


@dataclass
class Cluster:
    """A reachable Ray cluster: its address, the headers it needs, and a Jobs client."""

    address: str
    headers: dict[str, str] = field(default_factory=dict)
    _client: Any = None

    @property
    def client(self):
        """The JobSubmissionClient (created on first use)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            # The client lets RAY_ADDRESS override the address it is given; the address
            # chosen here (which already honours RAY_ADDRESS) must win.
            with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
                self._client = JobSubmissionClient(self.address, headers=dict(self.headers))
        return self._client

    def get_json(self, endpoint: str) -> Any:
        """GET a dashboard endpoint with the cluster's headers."""
        import requests

        reply = requests.get(f"{self.address}{endpoint}", headers=self.headers, timeout=30)
        if reply.status_code == 403:
            raise TargetError(
                f"the Ray cluster at {self.address} rejected the auth token (403); check "
                f"RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token"
            )
        reply.raise_for_status()
        return reply.json()


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None, recipe: Recipe | None = None) -> Cluster:
    """Resolve the address and check the cluster answers; TargetError when it does not."""
    resolved = resolve_address(address, recipe)
    return Cluster(resolved, auth_headers(resolved))


def cluster_shape(cluster: Cluster, wait_s: float = 10.0) -> ClusterShape:
    """Live nodes and total CPUs/GPUs, from the dashboard (works against any address).

    A head that just started may list no node for a moment, so an empty answer is retried.
    """
    deadline = time.monotonic() + wait_s
    while True:
        summary = cluster.get_json("/nodes?view=summary")["data"]["summary"]
        alive = [
            node["raylet"] for node in summary if node.get("raylet", {}).get("state") == "ALIVE"
        ]
        if alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    totals: dict[str, float] = {}
    for raylet in alive:
        for key, value in raylet.get("resourcesTotal", {}).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return ClusterShape(nodes=len(alive), cpus=totals.get("CPU", 0.0), gpus=totals.get("GPU", 0.0))


# ------------------------------------------------------------------------------ staging


def stage_working_dir(recipe_text: str, source: Path, dest: Path) -> Path:
    """Copy `source` (minus EXCLUDES) to `dest` and write the resolved recipe into it."""
    shutil.copytree(
        source, dest, ignore=shutil.ignore_patterns(*EXCLUDES), symlinks=False, dirs_exist_ok=True
    )
    (dest / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_WORKING_DIR_BYTES:
        raise TargetError(
            f"the job's working directory (a copy of {source}) is {size / 2**20:.0f} MiB; Ray "
            f"accepts at most {MAX_WORKING_DIR_BYTES / 2**20:.0f} MiB. Submit from a smaller "
            f"directory or move large data to a URI / absolute path on the cluster"
        )
    return dest


def launcher_outside(source: Path) -> Path | None:
    """The launcher package directory when it is not part of `source` (so it must ship too)."""
    package = Path(launcher.__file__).resolve().parent
    return None if package.is_relative_to(source.resolve()) else package


def build_runtime_env(
    recipe: Recipe, working_dir: Path, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The runtime_env of the job: code + recipe, pip extras, credentials by name.

    Each credential is sent as the reference ${NAME}: Ray expands it on the cluster from the
    node's own environment, so the value never leaves this machine.
    """
    env = os.environ if environ is None else environ
    env_vars = {name: "${" + name + "}" for name in env_names_set_here(recipe, env)}
    # The driver's own ray.init(runtime_env=...) may set variables too; let it combine with
    # this one instead of failing on a shared key.
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(EXCLUDES),
        "env_vars": env_vars,
    }
    package = launcher_outside(working_dir)
    if package is not None:
        runtime_env["py_modules"] = [str(package)]
    if recipe.cluster.pip:
        runtime_env["pip"] = list(recipe.cluster.pip)
    if recipe.cluster.image:
        runtime_env["image_uri"] = recipe.cluster.image
    return runtime_env


RAY_CLIENT_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


def quiet_ray_client_logs() -> None:
    """Ray's client logs every package it zips and uploads, and the end of each log stream, at
    INFO; keep the console to the job. Set after importing them: importing Ray configures its
    loggers again."""
    import ray.dashboard.modules.dashboard_sdk
    import ray.dashboard.modules.job.sdk  # noqa: F401

    for name in RAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def submission_id(recipe: Recipe, now: datetime | None = None) -> str:
    """<name>-<timestamp>, like the run directory: unique per submission, readable."""
    return run_name(recipe.name, now)


# ------------------------------------------------------------------------------- submit


@dataclass
class Submission:
    """A job submitted to a cluster, and what the user should know about it."""

    job_id: str
    cluster: Cluster
    notes: list[str] = field(default_factory=list)


def submit_to_ray(
    recipe: Recipe,
    recipe_text: str,
    address: str | None = None,
    *,
    source: Path | None = None,
    preflight: bool = True,
) -> Submission:
    """Preflight, stage and submit the driver as a Ray job.

    Raises TargetError (exit 2) for anything the user must fix first. Follow the job with
    follow_to_end.
    """
    quiet_ray_client_logs()
    cluster = connect(address, recipe)
    if preflight:
        check_cluster(recipe, cluster_shape(cluster), cluster.address)
        check_cluster_env(cluster, recipe, submit_entrypoint)
    note = relative_storage_note(recipe)
    source = (source or Path.cwd()).resolve()
    job_id = submission_id(recipe)
    with tempfile.TemporaryDirectory(prefix="ftlaunch-job-") as tmp:
        staged = stage_working_dir(recipe_text, source, Path(tmp) / "job")
        runtime_env = build_runtime_env(recipe, staged)
        job_id = _submit(cluster, recipe, runtime_env, job_id)
    return Submission(job_id, cluster, [note] if note else [])


def _submit(cluster: Cluster, recipe: Recipe, runtime_env: dict[str, Any], job_id: str) -> str:
    metadata = {"recipe": recipe.name, "ftlaunch_version": __version__}
    entrypoint = f"python -m launcher.job {RECIPE_FILE}"
    for attempt in range(2, 10):
        try:
            return submit_entrypoint(cluster, entrypoint, runtime_env, job_id, metadata)
        except JobIdTaken:
            # Two submissions of one recipe within a second share a timestamp.
            job_id = f"{submission_id(recipe)}-{attempt}"
    raise TargetError(f"could not find a free submission id for {recipe.name}")


class JobIdTaken(TargetError):
    """The submission id is already used on this cluster."""


def submit_entrypoint(
    cluster: Cluster,
    entrypoint: str,
    runtime_env: dict[str, Any],
    job_id: str,
    metadata: dict[str, str],
) -> str:
    """Submit one entrypoint with its runtime_env; returns the submission id.

    A head that just started has no job agent for a few seconds; that answer is retried.
    """
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return cluster.client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=job_id,
                metadata=metadata,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise JobIdTaken(f"a job {job_id!r} already exists on {cluster.address}") from None
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise TargetError(
                f"the Ray cluster at {cluster.address} refused the job: {exc}"
            ) from None


def relative_storage_note(recipe: Recipe) -> str | None:
    """A relative storage path lands inside the job's temporary working directory: say so."""
    path = recipe.checkpoint.storage_path
    if is_uri(path) or Path(os.path.expanduser(path)).is_absolute():
        return None
    return (
        f"note: checkpoint.storage_path {path!r} is relative: on the cluster it resolves "
        f"inside the job's temporary working directory; use an absolute path or a URI to "
        f"keep the run directory"
    )


# ------------------------------------------------------------------- status / logs / stop


def _job_call(cluster: Cluster, job_id: str, call: str, *args: Any) -> Any:
    try:
        return getattr(cluster.client, call)(job_id, *args)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise TargetError(
                f"no job {job_id!r} on the Ray cluster at {cluster.address}"
            ) from None
        raise TargetError(f"the Ray cluster at {cluster.address} answered: {exc}") from None


def job_status(job_id: str, address: str | None = None) -> dict[str, Any]:
    """status, message, start/end time and metadata of one job."""
    cluster = connect(address)
    info = _job_call(cluster, job_id, "get_job_info")
    return {
        "submission_id": info.submission_id or job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": dict(info.metadata or {}),
        "entrypoint": info.entrypoint,
    }


# Receives each chunk of a job's output as it arrives (the CLI writes it to the terminal).
OnOutput = Callable[[str], object]


def job_logs(
    job_id: str,
    address: str | None = None,
    follow: bool = False,
    on_output: OnOutput | None = None,
) -> str:
    """The job's output so far (follow: passed to `on_output` until the job ends); returns it."""
    cluster = connect(address)
    if not follow:
        return _job_call(cluster, job_id, "get_job_logs")
    _job_call(cluster, job_id, "get_job_status")  # a clear error for an unknown id
    return _tail(cluster, job_id, on_output)


def _tail(cluster: Cluster, job_id: str, on_output: OnOutput | None) -> str:
    chunks: list[str] = []

    async def pump() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            chunks.append(chunk)
            if on_output is not None:
                on_output(chunk)

    asyncio.run(pump())
    return "".join(chunks)


def follow_to_end(cluster: Cluster, job_id: str, on_output: OnOutput | None = None) -> str:
    """Pass the logs to `on_output` until the job ends; JobFailedError unless it SUCCEEDED."""
    _tail(cluster, job_id, on_output)
    status = wait_for_end(cluster, job_id, timeout_s=60)
    if status != "SUCCEEDED":
        info = cluster.client.get_job_info(job_id)
        detail = f": {info.message}" if info.message else ""
        raise JobFailedError(f"job {job_id} ended {status}{detail}")
    return status


def wait_for_end(cluster: Cluster, job_id: str, timeout_s: float | None = None) -> str:
    """Poll until the job is terminal; returns its status (or the last one on timeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(_job_call(cluster, job_id, "get_job_status").value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(0.5)


def stop_job(job_id: str, address: str | None = None, wait_s: float = 30.0) -> str:
    """Ask the job to stop and wait (up to wait_s) for it to end; returns its status."""
    cluster = connect(address)
    _job_call(cluster, job_id, "stop_job")
    return wait_for_end(cluster, job_id, timeout_s=wait_s)


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first: id, status, recipe, start time."""
    cluster = connect(address)
    try:
        jobs = cluster.client.list_jobs()
    except RuntimeError as exc:
        raise TargetError(f"the Ray cluster at {cluster.address} answered: {exc}") from None
    rows = [
        {
            "submission_id": job.submission_id or job.job_id or "",
            "status": str(job.status.value),
            "recipe": (job.metadata or {}).get("recipe", ""),
            "start_time": job.start_time,
            "entrypoint": job.entrypoint,
        }
        for job in jobs
    ]
    return sorted(rows, key=lambda row: row["start_time"] or 0)


# ----------------------------------------------------------------------------------- cli


def describe_submission(recipe: Recipe, source: Path | None = None) -> dict[str, Any]:
    """What submit would send (for --dry-run): entrypoint, id, runtime_env, metadata."""
    source = (source or Path.cwd()).resolve()
    runtime_env = build_runtime_env(recipe, source)
    runtime_env["working_dir"] = f"{source} (copied, minus excludes) + {RECIPE_FILE}"
    return {
        "submission_id": submission_id(recipe),
        "entrypoint": f"python -m launcher.job {RECIPE_FILE}",
        "runtime_env": runtime_env,
        "metadata": {"recipe": recipe.name, "ftlaunch_version": __version__},
    }
