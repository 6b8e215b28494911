"""Where the driver starts: in-process (local), a Ray cluster (ray_jobs), Kubernetes (kuberay).

Targets only start and watch the driver; nothing about training lives here. What they share:
TargetError (the job cannot be started as asked: exit 2; a job that ran and failed raises
launcher.errors.JobFailedError: exit 1), and which environment variables a job may need (passed
by name, never by value).
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher.errors import BadInputError
from launcher.recipe import Recipe


class TargetError(BadInputError):
    """The job cannot be started as asked (unreachable cluster, too few GPUs, ...): exit 2."""


# Credentials jobs commonly need. They travel by name only: a Ray cluster resolves them from
# its nodes' environment, a KubeRay pod from a Kubernetes Secret. Their values never go into
# a request, a manifest or a file written by ftlaunch.
SECRET_ENV_NAMES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
SECRET_ENV_PREFIXES = ("AWS_",)


def env_names_set_here(recipe: Recipe, environ: Mapping[str, str]) -> list[str]:
    """Names a Ray job should see: well-known credentials set in this shell, plus cluster.env.

    A credential the submitting shell has is taken as a sign the job needs it too; names in
    cluster.env are always passed (the cluster may have them even when this shell does not).
    """
    names = [
        name
        for name in sorted(environ)
        if environ[name] and (name in SECRET_ENV_NAMES or name.startswith(SECRET_ENV_PREFIXES))
    ]
    return _unique([*names, *recipe.cluster.env])


def env_names_for_pods(recipe: Recipe) -> list[str]:
    """Names a KubeRay pod reads from the Secret: the well-known credentials plus cluster.env."""
    return _unique([*SECRET_ENV_NAMES, *recipe.cluster.env])


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
