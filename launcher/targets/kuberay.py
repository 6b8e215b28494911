"""Target kuberay: a RayJob (ray.io/v1) that starts a Ray cluster on Kubernetes and runs the driver.

Two manifests: a ConfigMap holding the resolved recipe and the RayJob whose head mounts it and
runs `python -m launcher.job` on it. The head only schedules (`num-cpus: "0"`); one worker group
of exactly scaling.num_workers pods trains, or for an elastic [min, max] a group of min to max
pods that starts at max: KubeRay recreates a lost pod and the run grows back onto it
(`elastic_note`). Credentials come from a Secret by name (secretKeyRef); no value ever appears
in a manifest.

scaling.placement changes no manifest: it reaches Ray Train through the recipe in the ConfigMap.
Each worker pod is sized for one training worker (and one CPU for Ray Data), so spread gives
each worker its own pod, while pack may put two in one pod when both fit (cpus_per_worker: 1).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from launcher.recipe import Recipe, dump_recipe
from launcher.rundir import is_uri
from launcher.targets import TargetError, env_names_for_pods

RAY_VERSION = "2.60.0"
# Built from docker/Dockerfile (see docker/README.md).
DEFAULT_IMAGE = f"ftlaunch/ftlaunch:ray{RAY_VERSION}-gpu"
RECIPE_DIR = "/etc/ftlaunch"
RECIPE_KEY = "recipe.yaml"
MAX_RAYJOB_NAME = 47  # the operator appends a suffix for the RayCluster it creates
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
HEAD_CPUS = "2"


# ---------------------------------------------------------------------------------- names


def rayjob_name(run_name: str) -> str:
    """A DNS-1035 label of at most 47 characters derived from the run name.

    Lowercase, [a-z0-9-] only, starting with a letter, no trailing '-'.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if not name or not name[0].isalpha():
        name = f"ftl-{name}".rstrip("-")
    return name[:MAX_RAYJOB_NAME].rstrip("-")


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return value.strip("._-")


# ------------------------------------------------------------------------------ manifests


def _secret_env(recipe: Recipe) -> list[dict[str, Any]]:
    """Each credential as a secretKeyRef on cluster.secret; optional, so missing keys are fine."""
    return [
        {
            "name": name,
            "valueFrom": {
                "secretKeyRef": {"name": recipe.cluster.secret, "key": name, "optional": True}
            },
        }
        for name in env_names_for_pods(recipe)
    ]


def _container(
    recipe: Recipe, name: str, resources: dict[str, Any], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": name,
        "image": recipe.cluster.image or DEFAULT_IMAGE,
        "env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}, *_secret_env(recipe)],
        "resources": resources,
        "volumeMounts": mounts,
    }


SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def _head_group(recipe: Recipe, configmap: str) -> dict[str, Any]:
    memory = recipe.cluster.head_memory
    resources = {
        "requests": {"cpu": HEAD_CPUS, "memory": memory},
        "limits": {"cpu": HEAD_CPUS, "memory": memory},
    }
    container = _container(
        recipe,
        "ray-head",
        resources,
        [SHM_MOUNT, {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True}],
    )
    container["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    return {
        # The head schedules and runs the driver; training and data tasks go to the workers.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": {
                "containers": [container],
                "volumes": [SHM_VOLUME, {"name": "recipe", "configMap": {"name": configmap}}],
            }
        },
    }


def worker_gpus(recipe: Recipe) -> int:
    """GPUs each worker pod asks for: cluster.gpus_per_worker, none when scaling.use_gpu is
    false (a CPU run would hold GPUs it never uses, or wait for nodes that have them)."""
    return 0 if recipe.scaling.use_gpu is False else recipe.cluster.gpus_per_worker


def _worker_group(recipe: Recipe) -> dict[str, Any]:
    low, high = recipe.scaling.min_workers, recipe.scaling.max_workers
    gpus = worker_gpus(recipe)
    # One CPU beyond the training worker's share keeps room for the Ray Data tasks feeding it.
    cpus = str(recipe.scaling.cpus_per_worker + 1)
    memory = recipe.cluster.worker_memory
    limits: dict[str, Any] = {"cpu": cpus, "memory": memory}
    if gpus > 0:
        limits["nvidia.com/gpu"] = gpus
    resources = {"requests": {"cpu": cpus, "memory": memory}, "limits": limits}
    spec: dict[str, Any] = {
        "containers": [_container(recipe, "ray-worker", resources, [SHM_MOUNT])],
        "volumes": [SHM_VOLUME],
    }
    if gpus > 0:
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return {
        "groupName": "gpu-workers" if gpus > 0 else "cpu-workers",
        # Without the Ray autoscaler KubeRay keeps `replicas` pods: as many as the run can use.
        "replicas": high,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {},
        "template": {"spec": spec},
    }


def render_configmap(recipe: Recipe, recipe_text: str | None = None) -> dict[str, Any]:
    """The ConfigMap holding the resolved recipe the driver runs."""
    name = rayjob_name(recipe.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-recipe",
            "namespace": recipe.cluster.namespace,
            "labels": _labels(recipe),
        },
        "data": {RECIPE_KEY: recipe_text if recipe_text is not None else dump_recipe(recipe)},
    }


def _labels(recipe: Recipe) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "ftlaunch", "ftlaunch/recipe": label_value(recipe.name)}


def render_rayjob(recipe: Recipe) -> dict[str, Any]:
    """The RayJob: cluster spec, entrypoint on the mounted recipe, lifetime settings."""
    c = recipe.cluster
    name = rayjob_name(recipe.name)
    spec: dict[str, Any] = {
        "entrypoint": f"python -m launcher.job {RECIPE_DIR}/{RECIPE_KEY}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
        "backoffLimit": c.backoff_limit,
    }
    if c.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    if c.pip:
        spec["runtimeEnvYAML"] = yaml.safe_dump({"pip": list(c.pip)}, sort_keys=False)
    spec["rayClusterSpec"] = {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": _head_group(recipe, f"{name}-recipe"),
        "workerGroupSpecs": [_worker_group(recipe)],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": c.namespace, "labels": _labels(recipe)},
        "spec": spec,
    }


def render_kuberay(recipe: Recipe) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob]: apply in this order (the RayJob's head mounts the ConfigMap)."""
    rayjob = render_rayjob(recipe)
    problems = operator_problems(rayjob)
    if problems:
        raise TargetError(f"cannot render a valid RayJob for {recipe.name}: {'; '.join(problems)}")
    return [render_configmap(recipe), rayjob]


# ------------------------------------------------------------------------ operator rules

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GROUP_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


def operator_problems(manifest: dict[str, Any]) -> list[str]:
    """KubeRay (v1.7) rules a JSON Schema cannot check, for a RayJob or a RayCluster."""
    kind = manifest.get("kind")
    problems: list[str] = []
    name = manifest.get("metadata", {}).get("name", "")
    limit = MAX_RAYJOB_NAME if kind == "RayJob" else 53
    if not DNS_1035.match(name) or len(name) > limit:
        problems.append(f"metadata.name {name!r} must be a DNS-1035 label of <= {limit} chars")
    spec = manifest.get("spec", {})
    if kind == "RayJob":
        problems += _rayjob_problems(spec)
        cluster_spec = spec.get("rayClusterSpec") or {}
    else:
        cluster_spec = spec
    groups = [("headGroupSpec", cluster_spec.get("headGroupSpec") or {})]
    groups += [
        (f"workerGroupSpecs[{i}]", g)
        for i, g in enumerate(cluster_spec.get("workerGroupSpecs") or [])
    ]
    for where, group in groups:
        problems += _group_problems(where, group)
    return problems


def _rayjob_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append("exactly one of spec.rayClusterSpec and spec.clusterSelector")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("spec.backoffLimit must be >= 0")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("spec.ttlSecondsAfterFinished must be >= 0")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        problems.append("spec.activeDeadlineSeconds must be > 0")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.suspend needs spec.shutdownAfterJobFinishes: true")
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        if not isinstance(env, dict):
            problems.append("spec.runtimeEnvYAML must parse to a mapping")
        elif "working_dir" in env and "://" not in str(env["working_dir"]):
            problems.append("spec.runtimeEnvYAML working_dir must be a remote URI")
    return problems


def _group_problems(where: str, group: dict[str, Any]) -> list[str]:
    problems = []
    params = group.get("rayStartParams") or {}
    for key, value in params.items():
        if not isinstance(value, str):
            problems.append(f"{where}.rayStartParams.{key} must be a string")
    if "resources" in group and any(k in params for k in GROUP_RESOURCE_PARAMS):
        problems.append(f"{where}: rayStartParams resources together with group resources")
    if "minReplicas" in group or "maxReplicas" in group:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if low < 0 or high < 0 or low > high:
            problems.append(f"{where}: need 0 <= minReplicas <= maxReplicas")
    if not (group.get("template", {}).get("spec", {}).get("containers") or []):
        problems.append(f"{where}: the pod template needs a container")
    return problems


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe) as readable | blocks; no &anchors for repeated parts."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _str_representer)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """Manifests as one multi-document YAML stream (what `kubectl apply -f -` reads)."""
    return yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False, width=100)


def storage_note(recipe: Recipe) -> str | None:
    """A local storage path on Kubernetes vanishes with the pods; say so."""
    path = recipe.checkpoint.storage_path
    if is_uri(path):
        return None
    return (
        f"note: checkpoint.storage_path {path!r} is local to each pod and is deleted with the "
        f"cluster; use an s3:// or gs:// URI to keep the run (--set checkpoint.storage_path=...)"
    )


def elastic_note(recipe: Recipe) -> str | None:
    """What an elastic range means for the worker pods, and when an autoscaler is needed."""
    s = recipe.scaling
    if not s.elastic:
        return None
    return (
        f"note: scaling.num_workers [{s.min_workers}, {s.max_workers}]: the worker group starts "
        f"{s.max_workers} pods and KubeRay recreates a lost one, so the run shrinks and grows back "
        f"on its own; starting with fewer pods and adding them as the run asks needs the Ray "
        f"autoscaler (rayClusterSpec.enableInTreeAutoscaling: true, and replicas: "
        f"{s.min_workers})"
    )


def render_notes(recipe: Recipe) -> list[str]:
    """The notes to show next to the manifests."""
    return [n for n in (storage_note(recipe), elastic_note(recipe)) if n]


def render_yaml(recipe: Recipe) -> str:
    """`ftlaunch render kuberay`: the manifests as YAML (see storage_note for what to tell)."""
    return to_yaml(render_kuberay(recipe))


# -------------------------------------------------------------------------------- submit


def _kube_clients():
    """Core and custom-object API clients for the current kube context; TargetError if none."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise TargetError(
            "target kuberay needs the kubernetes client: pip install 'ftlaunch[kubernetes]'"
        ) from None
    try:
        config.load_kube_config()
    except (config.ConfigException, OSError) as exc:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise TargetError(
                f"no Kubernetes configuration found ({exc}); point KUBECONFIG at a kubeconfig "
                f"or run `kubectl config use-context <context>`"
            ) from None
    return client.CoreV1Api(), client.CustomObjectsApi()


def _api_call(what: str, call, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException

    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        raise TargetError(f"Kubernetes refused to {what}: {exc.status} {exc.reason}") from None
    except Exception as exc:  # urllib3 connection errors and the like
        raise TargetError(f"cannot reach the Kubernetes API to {what}: {exc}") from None


def submit_to_kuberay(recipe: Recipe, dry_run: bool = False) -> str:
    """Apply the ConfigMap and create the RayJob in cluster.namespace; returns the RayJob name.

    With dry_run, returns the manifests as YAML instead and touches nothing.
    """
    if dry_run:
        return render_yaml(recipe)
    configmap, rayjob = render_kuberay(recipe)
    core, custom = _kube_clients()
    namespace = recipe.cluster.namespace
    name = rayjob["metadata"]["name"]
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespaced_config_map(namespace, configmap)
    except ApiException as exc:
        if exc.status != 409:
            raise TargetError(
                f"Kubernetes refused to create ConfigMap {configmap['metadata']['name']}: "
                f"{exc.status} {exc.reason}"
            ) from None
        _api_call(
            "replace the recipe ConfigMap",
            core.replace_namespaced_config_map,
            configmap["metadata"]["name"],
            namespace,
            configmap,
        )
    except Exception as exc:
        raise TargetError(f"cannot reach the Kubernetes API: {exc}") from None
    try:
        custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", rayjob)
    except ApiException as exc:
        if exc.status == 409:
            raise TargetError(
                f"RayJob {name} already exists in namespace {namespace}; delete it first "
                f"(kubectl delete rayjob {name} -n {namespace}) or change `name`"
            ) from None
        raise TargetError(
            f"Kubernetes refused the RayJob {name}: {exc.status} {exc.reason}"
        ) from None
    return name


def kuberay_status(name: str, namespace: str = "default") -> dict[str, Any]:
    """A RayJob's jobStatus, jobDeploymentStatus, reason, message and dashboard URL."""
    _, custom = _kube_clients()
    obj = _api_call(
        f"read RayJob {name}",
        custom.get_namespaced_custom_object,
        "ray.io",
        "v1",
        namespace,
        "rayjobs",
        name,
    )
    return status_fields(obj)


def status_fields(rayjob: dict[str, Any]) -> dict[str, Any]:
    """The status fields that matter from a RayJob object (empty strings while unknown)."""
    status = rayjob.get("status") or {}
    return {
        "name": rayjob.get("metadata", {}).get("name", ""),
        "jobStatus": status.get("jobStatus", ""),
        "jobDeploymentStatus": status.get("jobDeploymentStatus", ""),
        "reason": status.get("reason", ""),
        "message": status.get("message", ""),
        "jobId": status.get("jobId", ""),
        "dashboardURL": status.get("dashboardURL", ""),
    }
