"""Checks made before a job goes to a cluster, so it fails here with a clear message.

Each check takes what the cluster reported (plain data) and raises TargetError naming the
recipe field to change. Ray itself would accept most of these jobs and then wait forever for
resources that never come, or fail late in a way that hides the cause.
"""

from __future__ import annotations

from launcher.raysession import ClusterShape, LayoutError, check_layout
from launcher.recipe import Recipe
from launcher.rundir import is_uri
from launcher.targets import TargetError


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
    try:
        check_layout(recipe, shape, f"the Ray cluster at {address}")
    except LayoutError as exc:
        raise TargetError(str(exc)) from None
    check_storage(recipe, shape, address)
