"""Checks made before a job goes to a cluster, so it fails here with a clear message.

Each check takes what the cluster reported (plain data) and raises TargetError naming the
recipe field to change. Ray itself would accept most of these jobs and then wait forever for
resources that never come, or fail late in a way that hides the cause.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.recipe import Recipe
from launcher.targets import TargetError


@dataclass(frozen=True)
class ClusterShape:
    """What a running Ray cluster offers: live nodes and their total resources."""

    nodes: int
    cpus: float
    gpus: float


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI (s3://, gs://, file://...) rather than a local path."""
    return "://" in path


def gpus_needed(recipe: Recipe, shape: ClusterShape) -> int:
    """GPUs the training workers will ask for (scaling.use_gpu: auto follows the cluster)."""
    use_gpu = recipe.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = shape.gpus > 0
    return recipe.scaling.num_workers if use_gpu else 0


def check_resources(recipe: Recipe, shape: ClusterShape, address: str) -> None:
    """Refuse a scaling section the cluster cannot schedule."""
    s = recipe.scaling
    gpus = gpus_needed(recipe, shape)
    if gpus > shape.gpus:
        raise TargetError(
            f"scaling asks for {gpus} GPU worker(s) (scaling.num_workers: {s.num_workers}, "
            f"scaling.use_gpu: {str(s.use_gpu).lower()}) but the Ray cluster at {address} has "
            f"{shape.gpus:g} GPU(s) on {shape.nodes} node(s); lower scaling.num_workers, set "
            f"scaling.use_gpu: false, or add GPU nodes"
        )
    cpus = s.num_workers * s.cpus_per_worker
    if cpus > shape.cpus:
        raise TargetError(
            f"scaling asks for {s.num_workers} worker(s) x {s.cpus_per_worker} CPU = {cpus} CPUs "
            f"but the Ray cluster at {address} has {shape.cpus:g} CPU(s) on {shape.nodes} "
            f"node(s); lower scaling.num_workers or scaling.cpus_per_worker"
        )


def check_storage(recipe: Recipe, shape: ClusterShape, address: str) -> None:
    """Refuse a local storage path on a multi-node cluster.

    Every worker writes its checkpoint shard under storage_path and the driver reads them all
    back to export the model; with a path local to each node the pieces end up scattered over
    machines and the export fails long after training finished.
    """
    path = recipe.checkpoint.storage_path
    if shape.nodes > 1 and not is_uri(path):
        raise TargetError(
            f"checkpoint.storage_path {path!r} is a local path but the Ray cluster at {address} "
            f"has {shape.nodes} nodes: each node would keep its own pieces of the run. Use "
            f"storage every node reaches: an s3:// or gs:// URI, or a shared filesystem "
            f"mounted at the same path on every node given as a file:// URI"
        )


def check_cluster(recipe: Recipe, shape: ClusterShape, address: str) -> None:
    """All checks against a running Ray cluster, in the order a user would fix them."""
    if shape.nodes == 0:
        raise TargetError(f"the Ray cluster at {address} reports no live nodes")
    check_resources(recipe, shape, address)
    check_storage(recipe, shape, address)
