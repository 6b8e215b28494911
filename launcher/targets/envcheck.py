"""Before a job goes to a Ray cluster: can the cluster's Python run it?

A Ray job runs `python -m launcher.job` with whatever `python` the head finds, and its training
workers in the Python each node's Ray was started with. When that is not an environment with
ftlaunch's dependencies, the job fails only after the upload, on the first missing import
(`No module named 'rich'`). This check runs a tiny Ray job first (envprobe.py as `python -c`,
nothing uploaded, zero CPUs, a few seconds) that reports the versions the driver and every
node can import, and refuses with exit 2 and one message naming everything to fix.

Why a job and not a Ray Client connection: a job goes through the same dashboard address and
token the submission uses, runs in exactly the `python` the real job will run in (a Ray
Client would use the client server's Python instead), needs no extra port, and works even
when the client and cluster Pythons differ (Ray Client refuses a different Python minor).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import BadInputError
from launcher.recipe import Recipe
from launcher.targets import TargetError
from launcher.targets.envprobe import MARKER

# ftlaunch's runtime dependencies (pyproject.toml [project].dependencies): distribution ->
# (module, minimum version). tests/test_envcheck.py keeps the two lists equal.
RUNTIME_PACKAGES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "2.4"),
    "transformers": ("transformers", "5.0"),
    "peft": ("peft", "0.17"),
    "deepspeed": ("deepspeed", "0.16"),
    "ray": ("ray", "2.50"),
    "datasets": ("datasets", "3.0"),
    "accelerate": ("accelerate", "1.0"),
    "pyarrow": ("pyarrow", "15"),
    "click": ("click", "8.1"),
    "pydantic": ("pydantic", "2.7"),
    "pyyaml": ("yaml", "6.0"),
    "rich": ("rich", "13"),
    "matplotlib": ("matplotlib", "3.8"),
    "gguf": ("gguf", "0.10"),
    "psutil": ("psutil", "5.9"),
}
# Ray client and cluster must be the same release; a model trained and exported with another
# torch / transformers minor than the one tested here is a different program.
SAME_VERSION = ("ray",)
SAME_MINOR = ("torch", "transformers")
SKIP_ENV = "FTLAUNCH_SKIP_ENV_CHECK"
PROBE_TIMEOUT_S = 180.0
# A runtime_env pip list is installed before the probe starts: minutes on a cold node.
PROBE_WITH_PIP_TIMEOUT_S = 900.0


class ClusterEnvError(TargetError, BadInputError):
    """The cluster's Python lacks, or has other versions of, what the job imports: exit 2."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one Python of the cluster."""

    where: str
    package: str
    found: str | None
    wanted: str

    def __str__(self) -> str:
        found = "missing" if self.found is None else self.found
        return f"{self.package}: {found} (needs {self.wanted})"


# ------------------------------------------------------------------- the comparison (pure)


def required_packages(recipe: Recipe) -> dict[str, str]:
    """Distribution -> module of everything the job imports (deepspeed only when used)."""
    return {
        dist: module
        for dist, (module, _) in RUNTIME_PACKAGES.items()
        if dist != "deepspeed" or recipe.strategy.name == "deepspeed"
    }


def local_versions(packages: Mapping[str, str]) -> dict[str, str | None]:
    """The version of each distribution installed here (None: not installed here)."""
    found: dict[str, str | None] = {}
    for dist in packages:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def release(version: str, parts: int) -> tuple[int, ...]:
    """The first `parts` numbers of a version, zero-padded ('2.13.0+cpu', 2 -> (2, 13))."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    numbers = [int(n) for n in match.group(0).split(".")] if match else []
    return tuple((numbers + [0] * parts)[:parts])


def wanted_version(dist: str, here: str | None) -> str:
    """What the cluster must have, in words, given this machine's version."""
    minimum = RUNTIME_PACKAGES[dist][1]
    if here and dist in SAME_VERSION:
        return f"=={here}, as here"
    if here and dist in SAME_MINOR:
        return f"{'.'.join(map(str, release(here, 2)))}.x, as here ({here})"
    return f">={minimum}"


def package_problem(dist: str, found: str | None, here: str | None) -> str | None:
    """Why `found` (the cluster's version) will not do, or None when it will."""
    if found is None:
        return "missing"
    if found == "unknown":
        return None
    if here and dist in SAME_VERSION and release(found, 3) != release(here, 3):
        return "different"
    if here and dist in SAME_MINOR and release(found, 2) != release(here, 2):
        return "different"
    if release(found, 3) < release(RUNTIME_PACKAGES[dist][1], 3):
        return "too old"
    return None


def compare_environments(
    here: Mapping[str, str | None], cluster: Mapping[str, Mapping[str, Any]]
) -> list[Problem]:
    """Every package that will not do, in every Python of the cluster.

    `here`: distribution -> version on this machine. `cluster`: a label (the job driver, a
    node) -> its probe report ({"python", "executable", "packages": {dist: version|None}}).
    """
    problems: list[Problem] = []
    for where, report in cluster.items():
        for dist, found in report["packages"].items():
            if package_problem(dist, found, here.get(dist)):
                problems.append(Problem(where, dist, found, wanted_version(dist, here.get(dist))))
    pythons = {report["python"].rsplit(".", 1)[0] for report in cluster.values()}
    if len(pythons) > 1:
        listing = ", ".join(f"{where}: {report['python']}" for where, report in cluster.items())
        problems.append(Problem("cluster", "python", listing, "one Python minor on every node"))
    return problems


def reports_by_place(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The probe's answer keyed by a label a user recognizes."""
    driver = report["driver"]
    places = {f"job driver (`python` on the head: {driver['executable']})": driver}
    for node in report.get("nodes", []):
        places[f"workers on node {node['node']} ({node['executable']})"] = node
    return places


def explain(problems: list[Problem], address: str, recipe: Recipe) -> str:
    """One message: what is wrong where, and the two ways to fix it."""
    lines = [
        f"the Ray cluster at {address} cannot run this job: its Python environment lacks or "
        f"has other versions of what ftlaunch needs"
    ]
    places: dict[str, list[Problem]] = {}
    for problem in problems:
        places.setdefault(problem.where, []).append(problem)
    for where, found in places.items():
        lines.append(f"  {where}:")
        lines.extend(f"    - {problem}" for problem in found)
    pins = sorted({pin_for(p) for p in problems if p.package != "python"})
    lines.append(
        "fix: run the cluster from the project's image (docker/Dockerfile; the recipe's "
        "cluster.image), or start the Ray nodes from a Python environment with ftlaunch "
        "installed (`pip install -c constraints.txt .`)"
    )
    if pins:
        current = list(recipe.cluster.pip)
        lines.append(
            f"  or have Ray install them into the job's runtime_env: cluster.pip: "
            f"{json.dumps(current + [p for p in pins if p not in current])} in the recipe"
        )
    lines.append(f"to submit without this check: {SKIP_ENV}=1")
    return "\n".join(lines)


def pin_for(problem: Problem) -> str:
    """A pip requirement that fixes one problem."""
    if problem.wanted.startswith("=="):
        return f"{problem.package}{problem.wanted.split(',')[0]}"
    if ", as here (" in problem.wanted:
        return f"{problem.package}=={problem.wanted.split('(')[1].rstrip(')')}"
    return f"{problem.package}{problem.wanted}"


# ------------------------------------------------------------------ running it on the cluster

Submit = Callable[[Any, str, dict[str, Any], str, dict[str, str]], str]


def probe_entrypoint(packages: Mapping[str, str]) -> str:
    """`python -c <envprobe.py> <packages>`: the probe travels inside the command line."""
    source = (Path(__file__).parent / "envprobe.py").read_text(encoding="utf-8")
    return f"python -c {shlex.quote(source)} {shlex.quote(json.dumps(dict(packages)))}"


def probe_runtime_env(recipe: Recipe) -> dict[str, Any]:
    """The parts of the job's runtime_env that change its Python: pip list, image."""
    runtime_env: dict[str, Any] = {}
    if recipe.cluster.pip:
        runtime_env["pip"] = list(recipe.cluster.pip)
    if recipe.cluster.image:
        runtime_env["image_uri"] = recipe.cluster.image
    return runtime_env


def run_probe(cluster: Any, recipe: Recipe, submit: Submit) -> dict[str, Any]:
    """Run the probe as a Ray job on `cluster` (ray_jobs.Cluster); returns its report.

    `submit` is ray_jobs.submit_entrypoint (it waits for a fresh head's job agent).
    """
    packages = required_packages(recipe)
    runtime_env = probe_runtime_env(recipe)
    job_id = f"ftlaunch-envcheck-{uuid.uuid4().hex[:8]}"
    submit(cluster, probe_entrypoint(packages), runtime_env, job_id, {"ftlaunch": "envcheck"})
    timeout = PROBE_WITH_PIP_TIMEOUT_S if runtime_env else PROBE_TIMEOUT_S
    try:
        status = wait_for_probe(cluster.client, job_id, timeout)
        logs = cluster.client.get_job_logs(job_id)
    finally:
        forget_job(cluster.client, job_id)
    report = parse_report(logs)
    if report is None:
        tail = "\n".join(logs.strip().splitlines()[-15:])
        raise ClusterEnvError(
            f"the Ray cluster at {cluster.address} could not run the environment check (a "
            f"`python -c` job, status {status}); the job's `python` may be missing or not "
            f"the environment Ray runs in. Its output:\n{tail}\n"
            f"to submit without this check: {SKIP_ENV}=1"
        )
    return report


def wait_for_probe(client: Any, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return f"{status}, stopped after {timeout_s:.0f} s"
        time.sleep(0.5)


def forget_job(client: Any, job_id: str) -> None:
    """Delete the probe job so `ftlaunch list` shows only real jobs (best effort)."""
    # A job still stopping cannot be deleted yet; leaving it is harmless.
    with contextlib.suppress(Exception):
        client.delete_job(job_id)


def parse_report(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    return None


def check_cluster_env(
    cluster: Any, recipe: Recipe, submit: Submit, environ: Mapping[str, str] | None = None
) -> None:
    """Refuse (ClusterEnvError, exit 2) a cluster whose Python cannot run this job.

    Skipped when FTLAUNCH_SKIP_ENV_CHECK is set to a true value.
    """
    env = os.environ if environ is None else environ
    if env.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    report = run_probe(cluster, recipe, submit)
    places = reports_by_place(report)
    here = local_versions(required_packages(recipe))
    problems = compare_environments(here, places)
    # Without ray the driver cannot reach the nodes: that is one of the problems already.
    if "nodes_error" in report and not problems:
        raise ClusterEnvError(
            f"the environment check could not reach the nodes of the Ray cluster at "
            f"{cluster.address}: {report['nodes_error']}\n"
            f"to submit without this check: {SKIP_ENV}=1"
        )
    if problems:
        raise ClusterEnvError(explain(problems, cluster.address, recipe))
