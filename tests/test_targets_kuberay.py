"""Target kuberay: every shipped recipe renders a RayJob + ConfigMap that KubeRay v1.7 accepts."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import minimal_recipe

from launcher.recipe import load_recipe, validate_data
from launcher.targets import SECRET_ENV_NAMES
from launcher.targets.kuberay import (
    DEFAULT_IMAGE,
    RECIPE_DIR,
    RECIPE_KEY,
    operator_problems,
    rayjob_name,
    render_kuberay,
    render_notes,
    status_fields,
    to_yaml,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO.parent / "shared" / "kuberay" / "schemas"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def strict_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / f"{kind}.v1.strict.json").read_text()))


def drop_none(value):
    """The API server drops nulls before validating; do the same."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"]]


def check_rendered(recipe) -> tuple[dict, dict]:
    """Schema + operator rules + the ftlaunch layout, checked field by field."""
    configmap, rayjob = render_kuberay(recipe)
    strict_validator("rayjob").validate(drop_none(rayjob))
    assert operator_problems(rayjob) == []
    name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47

    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == recipe.cluster.ttl_seconds_after_finished >= 0
    assert spec["backoffLimit"] == recipe.cluster.backoff_limit >= 0
    assert ("rayClusterSpec" in spec) and ("clusterSelector" not in spec)
    assert spec["entrypoint"] == f"python -m launcher.job {RECIPE_DIR}/{RECIPE_KEY}"

    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    mount = next(m for m in head_pod["containers"][0]["volumeMounts"] if m["name"] == "recipe")
    volume = next(v for v in head_pod["volumes"] if v["name"] == "recipe")
    assert mount["mountPath"] == RECIPE_DIR
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]

    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    low, high = recipe.scaling.min_workers, recipe.scaling.max_workers
    assert (workers["minReplicas"], workers["maxReplicas"], workers["replicas"]) == (
        low,
        high,
        high,
    )
    gpus = 0 if recipe.scaling.use_gpu is False else recipe.cluster.gpus_per_worker
    worker_pod = workers["template"]["spec"]
    limits = worker_pod["containers"][0]["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            worker_pod["tolerations"]
        )
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in worker_pod
    for pod in (head_pod, worker_pod):
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    for container in containers(rayjob):
        assert container["image"] == (recipe.cluster.image or DEFAULT_IMAGE)
        for var in container["env"]:
            assert "value" not in var or var["name"] == "TOKENIZERS_PARALLELISM"

    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["namespace"] == rayjob["metadata"]["namespace"]
    shipped = validate_data(yaml.safe_load(configmap["data"][RECIPE_KEY]))
    assert shipped.model_dump() == recipe.model_dump()
    return configmap, rayjob


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_renders_valid_manifests(path):
    assert RECIPES, "no shipped recipes"
    check_rendered(load_recipe(path))


def test_render_follows_the_cluster_section():
    recipe = minimal_recipe(
        scaling={"num_workers": 4, "cpus_per_worker": 6},
        cluster={
            "target": "kuberay",
            "image": "registry.example.com/ml/ftlaunch:1",
            "namespace": "ml",
            "gpus_per_worker": 2,
            "ttl_seconds_after_finished": 60,
            "active_deadline_seconds": 7200,
            "backoff_limit": 2,
            "pip": ["sentencepiece==0.2.0"],
        },
    )
    _, rayjob = check_rendered(recipe)
    spec = rayjob["spec"]
    assert rayjob["metadata"]["namespace"] == "ml"
    assert (spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (60, 7200)
    assert spec["backoffLimit"] == 2
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"pip": ["sentencepiece==0.2.0"]}
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["cpu"] == "7"  # 6 for training + 1 for Ray Data


def test_placement_travels_in_the_recipe_and_changes_no_manifest():
    def rendered(placement: str) -> tuple[dict, dict]:
        scaling = {"num_workers": 2, "placement": placement}
        return check_rendered(minimal_recipe(scaling=scaling, cluster={"target": "kuberay"}))

    (pack_map, pack_job), (spread_map, spread_job) = rendered("pack"), rendered("spread")
    assert pack_job == spread_job
    recipe = yaml.safe_load(spread_map["data"][RECIPE_KEY])
    assert recipe["scaling"]["placement"] == "spread"
    assert yaml.safe_load(pack_map["data"][RECIPE_KEY])["scaling"]["placement"] == "pack"


def test_an_elastic_range_renders_min_and_max_replicas_with_a_note(tmp_path):
    from click.testing import CliRunner

    from launcher.cli import cli

    recipe = minimal_recipe(
        train={"max_failures": 3},
        scaling={"num_workers": [2, 5]},
        cluster={"target": "kuberay"},
        checkpoint={"storage_path": "s3://bucket/runs"},
    )
    _, rayjob = check_rendered(recipe)
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"], workers["replicas"]) == (2, 5, 5)
    (note,) = render_notes(recipe)
    assert "[2, 5]" in note and "enableInTreeAutoscaling" in note
    # a fixed count, and [n, n], need no note
    for fixed in (3, [3, 3]):
        plain = minimal_recipe(
            scaling={"num_workers": fixed},
            cluster={"target": "kuberay"},
            checkpoint={"storage_path": "s3://bucket/runs"},
        )
        assert render_notes(plain) == []
    path = tmp_path / "elastic.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "elastic",
                "model": {"name_or_path": "gpt2"},
                "data": {"train": "train.jsonl"},
                "train": {"max_failures": 3},
                "scaling": {"num_workers": [1, 2]},
            }
        )
    )
    result = CliRunner().invoke(cli, ["render", "kuberay", str(path)])
    assert result.exit_code == 0, result.output
    assert "scaling.num_workers [1, 2]" in result.stderr
    assert "minReplicas: 1" in result.stdout and "maxReplicas: 2" in result.stdout


def test_cpu_only_workers_have_no_gpu_limits_or_tolerations():
    check_rendered(minimal_recipe(cluster={"target": "kuberay", "gpus_per_worker": 0}))
    # a run that does not use GPUs asks for none, whatever gpus_per_worker says
    cpu_run = minimal_recipe(cluster={"target": "kuberay"}, scaling={"use_gpu": False})
    _, rayjob = check_rendered(cpu_run)
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["groupName"] == "cpu-workers"


@pytest.mark.parametrize(
    ("run_name", "expected"),
    [
        ("gpt2-medium-alpaca", "gpt2-medium-alpaca"),
        ("GPT2_Medium.v2", "gpt2-medium-v2"),
        ("7b-llama", "ftl-7b-llama"),
        ("a" * 60, "a" * 47),
        ("x-" * 30, ("x-" * 24)[:47].rstrip("-")),
        ("run__--__name", "run-name"),
    ],
)
def test_rayjob_name_is_dns_1035_within_47(run_name, expected):
    name = rayjob_name(run_name)
    assert name == expected
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47


def test_secret_values_never_appear_in_rendered_files(tmp_path, monkeypatch):
    secret = "hf_SECRET_VALUE_abc123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MY_API_KEY", "my-other-secret-999")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "name: tiny-job\nmodel: {name_or_path: some/model}\ndata: {train: train.jsonl}\n"
        "cluster: {target: kuberay, env: [MY_API_KEY], secret: team-creds}\n"
    )
    out = tmp_path / "rendered.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "render",
            "kuberay",
            str(recipe_file),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert secret not in text and "my-other-secret-999" not in text
    _configmap, rayjob = yaml.safe_load_all(text)
    for container in containers(rayjob):
        refs = {
            v["name"]: v["valueFrom"]["secretKeyRef"] for v in container["env"] if "valueFrom" in v
        }
        assert set(refs) == {*SECRET_ENV_NAMES, "MY_API_KEY"}
        assert refs["HF_TOKEN"] == {"name": "team-creds", "key": "HF_TOKEN", "optional": True}


def test_multiline_recipe_is_a_readable_block_and_yaml_round_trips():
    recipe = minimal_recipe()
    text = to_yaml(render_kuberay(recipe))
    assert f"  {RECIPE_KEY}: |" in text and "&id" not in text
    _configmap, rayjob = yaml.safe_load_all(text)
    assert rayjob == render_kuberay(recipe)[1]


def test_operator_rules_catch_broken_manifests():
    _, rayjob = render_kuberay(minimal_recipe())
    broken = json.loads(json.dumps(rayjob))
    broken["metadata"]["name"] = "Bad_Name"
    broken["spec"]["clusterSelector"] = {"ray.io/cluster": "x"}
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    broken["spec"]["runtimeEnvYAML"] = "working_dir: ./local\n"
    problems = " | ".join(operator_problems(broken))
    for part in ("DNS-1035", "exactly one of", "must be a string", "minReplicas", "remote URI"):
        assert part in problems


def test_status_fields_read_job_and_deployment_status():
    obj = {
        "metadata": {"name": "j"},
        "status": {
            "jobStatus": "FAILED",
            "jobDeploymentStatus": "Failed",
            "reason": "DeadlineExceeded",
            "message": "too slow",
        },
    }
    fields = status_fields(obj)
    assert (fields["jobStatus"], fields["jobDeploymentStatus"]) == ("FAILED", "Failed")
    assert fields["reason"] == "DeadlineExceeded"
    assert status_fields({"metadata": {"name": "j"}})["jobStatus"] == ""


# ------------------------------------------------------------------------ submit --target kuberay


def ftlaunch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: tiny-job\nmodel: {name_or_path: some/model}\ndata: {train: train.jsonl}\n"
    )
    return path


def test_submit_kuberay_dry_run_prints_valid_manifests(recipe_file):
    proc = ftlaunch(
        "submit", str(recipe_file), "--target", "kuberay", "--dry-run", env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr
    configmap, rayjob = yaml.safe_load_all(proc.stdout)
    assert configmap["kind"] == "ConfigMap" and rayjob["kind"] == "RayJob"
    strict_validator("rayjob").validate(drop_none(rayjob))


def test_submit_kuberay_without_kubeconfig_exits_2(recipe_file, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = ftlaunch("submit", str(recipe_file), "--target", "kuberay", env=env)
    assert proc.returncode == 2
    assert "no Kubernetes configuration found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_submit_kuberay_unreachable_api_exits_2(recipe_file, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    proc = ftlaunch("submit", str(recipe_file), "--target", "kuberay", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the Kubernetes API" in proc.stderr
    assert "Traceback" not in proc.stderr
