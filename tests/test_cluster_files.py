"""cluster/ and docker/: the shipped configs validate and agree with the pinned versions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

from launcher.recipe import load_recipe
from launcher.targets.kuberay import DEFAULT_IMAGE, RAY_VERSION, operator_problems

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CLUSTER = REPO / "cluster"
DOCKER = REPO / "docker"


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def validator(path: Path) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def test_ray_up_config_validates_and_has_gpu_workers():
    (config,) = load_docs(CLUSTER / "ray-cluster-aws.yaml")
    validator(SHARED / "ray" / "ray-schema.json").validate(config)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith("g5")]
    assert gpu_types and all(t["min_workers"] == t["max_workers"] >= 1 for t in gpu_types)
    assert config["docker"]["image"] == DEFAULT_IMAGE
    # credentials reach the nodes from a secret store, never from the file itself
    text = (CLUSTER / "ray-cluster-aws.yaml").read_text()
    assert "hf_" not in text and "aws ssm get-parameter" in text


def test_ray_up_schema_rejects_a_broken_copy():
    (config,) = load_docs(CLUSTER / "ray-cluster-aws.yaml")
    config["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}
    errors = list(validator(SHARED / "ray" / "ray-schema.json").iter_errors(config))
    assert errors


def test_kuberay_examples_validate_strictly_and_follow_operator_rules():
    schemas = SHARED / "kuberay" / "schemas"
    seen = set()
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in load_docs(path):
            kind = doc["kind"].lower()
            validator(schemas / f"{kind}.v1.strict.json").validate(doc)
            assert operator_problems(doc) == [], path
            seen.add(doc["kind"])
            cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert cluster["rayVersion"] == RAY_VERSION
            assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
            pods = [cluster["headGroupSpec"]["template"]["spec"]]
            pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
            for pod in pods:
                for container in pod["containers"]:
                    assert container["image"] == DEFAULT_IMAGE
                    assert all(
                        "value" not in v or not v["name"].endswith(("TOKEN", "KEY"))
                        for v in container["env"]
                    )
    assert seen == {"RayCluster", "RayJob"}


def test_rayjob_example_runs_the_gpt2_medium_recipe():
    (rayjob,) = load_docs(CLUSTER / "kuberay" / "rayjob-gpt2-medium.yaml")
    assert rayjob["metadata"]["name"] == "gpt2-medium"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in head["volumes"] if v["name"] == "recipe")
    assert volume["configMap"]["name"] == "gpt2-medium-recipe"
    text = (CLUSTER / "kuberay" / "rayjob-gpt2-medium.yaml").read_text()
    assert "--from-file=recipe.yaml=recipes/gpt2-medium.yaml" in text
    assert rayjob["spec"]["entrypoint"].endswith("/etc/ftlaunch/recipe.yaml")
    # sized for the shipped recipe: one worker pod per training worker, its CPUs + 1 for data
    recipe = load_recipe(REPO / "recipes" / "gpt2-medium.yaml")
    (workers,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["maxReplicas"] == recipe.scaling.num_workers
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == str(recipe.scaling.cpus_per_worker + 1)
    (config,) = load_docs(CLUSTER / "ray-cluster-aws.yaml")
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == recipe.scaling.num_workers


def test_dockerfile_matches_the_pinned_ray_and_runs_unprivileged():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    pinned = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert pinned and pinned.group(1) == ray.__version__ == RAY_VERSION
    assert f"ARG RAY_VERSION={RAY_VERSION}" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "-c constraints.txt" in dockerfile
    readme = (DOCKER / "README.md").read_text()
    assert f"docker build -f docker/Dockerfile -t {DEFAULT_IMAGE} ." in readme


def test_cluster_readme_covers_both_paths():
    readme = (CLUSTER / "README.md").read_text()
    for step in (
        "ray up cluster/ray-cluster-aws.yaml",
        "ftlaunch submit recipes/gpt2-medium.yaml",
        "--target kuberay",
        "ftlaunch render kuberay",
        "kubectl apply -f cluster/kuberay/raycluster.yaml",
        "ftlaunch status",
        "ftlaunch logs",
        "ftlaunch stop",
    ):
        assert step in readme, step
