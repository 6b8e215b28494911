"""What a Ray cluster's Python can import: run ON the cluster by the environment check.

This file is sent as the source of a `python -c` job entrypoint, so it must stand alone: the
standard library and (when the cluster has it) ray, nothing from the launcher. It reports the
job driver's Python (the `python` a job entrypoint finds on the head) and, through one
zero-CPU task pinned to each live node, the Python that Ray starts workers with there. It
prints one line, MARKER followed by JSON.

    python envprobe.py '{"rich": "rich", "pyyaml": "yaml", ...}'    # distribution -> module
"""

from __future__ import annotations

import json
import sys

MARKER = "FTLAUNCH-ENV-REPORT "
NODE_TIMEOUT_S = 120


def probe(packages: dict[str, str]) -> dict:
    """This interpreter: its version, path, and the version of each distribution (None: absent).

    A distribution counts as present only when its module can be found too; nothing is
    imported (torch or deepspeed would take seconds each).
    """
    import importlib.metadata
    import importlib.util

    found: dict[str, str | None] = {}
    for dist, module in packages.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            found[dist] = None
            continue
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "unknown"
    return {
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "executable": sys.executable,
        "packages": found,
    }


def probe_nodes(packages: dict[str, str]) -> list[dict]:
    """probe() on every live node, in the Python Ray starts workers with there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(log_to_driver=False, configure_logging=False)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    remote = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(packages)
        for node in nodes
    ]
    reports = ray.get(refs, timeout=NODE_TIMEOUT_S)
    for node, report in zip(nodes, reports, strict=True):
        report["node"] = node.get("NodeManagerAddress", "?")
        report["node_id"] = node["NodeID"]
    return reports


def main(argv: list[str]) -> int:
    packages = json.loads(argv[1])
    report: dict = {"driver": probe(packages)}
    try:
        report["nodes"] = probe_nodes(packages)
    except Exception as exc:  # reported, not raised: the client explains it
        report["nodes_error"] = f"{type(exc).__name__}: {exc}"
    print(MARKER + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
