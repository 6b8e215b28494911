"""The cluster environment check: the comparison (no Ray) and the probe that runs on a cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import minimal_recipe

from launcher.errors import BadInputError
from launcher.targets import TargetError, envprobe
from launcher.targets import envcheck as E

REPO = Path(__file__).resolve().parent.parent
HERE = {
    "torch": "2.13.0+cpu",
    "transformers": "5.23.0",
    "ray": "2.60.0",
    "rich": "14.1.0",
    "pyyaml": "6.0.3",
    "deepspeed": None,  # not installed on the submitting machine
}


def report(packages: dict[str, str | None], python: str = "3.11.7", exe: str = "/env/python"):
    return {"python": python, "executable": exe, "packages": packages}


def good_cluster_packages() -> dict[str, str | None]:
    return {
        "torch": "2.13.1",
        "transformers": "5.23.4",
        "ray": "2.60.0",
        "rich": "13.0",
        "pyyaml": "6.0.1",
    }


def test_runtime_package_table_matches_pyproject():
    """The table of what a job imports is pyproject's dependency list, same minimums."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for spec in deps:
        name, minimum = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=(\S+)", spec).groups()
        declared[name.lower()] = minimum
    assert declared == {dist: minimum for dist, (_, minimum) in E.RUNTIME_PACKAGES.items()}


def test_deepspeed_required_only_by_the_deepspeed_strategy():
    assert "deepspeed" not in E.required_packages(minimal_recipe())
    recipe = minimal_recipe(strategy={"name": "deepspeed"})
    assert E.required_packages(recipe)["deepspeed"] == "deepspeed"
    assert E.required_packages(recipe)["pyyaml"] == "yaml"


def test_matching_cluster_has_no_problems():
    cluster = {"driver": report(good_cluster_packages()), "node": report(good_cluster_packages())}
    assert E.compare_environments(HERE, cluster) == []


def test_missing_and_mismatched_packages_are_each_named():
    packages = good_cluster_packages()
    packages.update(rich=None, ray="2.59.0", transformers="4.57.1", torch="2.13.0")
    problems = E.compare_environments(HERE, {"driver": report(packages)})
    by_package = {p.package: p for p in problems}
    assert set(by_package) == {"rich", "ray", "transformers"}
    assert str(by_package["rich"]) == "rich: missing (needs >=13)"
    assert str(by_package["ray"]) == "ray: 2.59.0 (needs ==2.60.0, as here)"
    assert (
        str(by_package["transformers"]) == "transformers: 4.57.1 (needs 5.23.x, as here (5.23.0))"
    )


def test_without_a_local_version_only_presence_and_minimum_count():
    packages = {"deepspeed": "0.15.0", "pyyaml": "5.4"}
    problems = E.compare_environments({"pyyaml": None}, {"driver": report(packages)})
    assert {(p.package, p.wanted) for p in problems} == {
        ("deepspeed", ">=0.16"),
        ("pyyaml", ">=6.0"),
    }
    assert E.compare_environments({}, {"d": report({"deepspeed": "0.18.2+cpu"})}) == []


def test_python_minor_must_agree_across_the_cluster():
    cluster = {
        "driver": report(good_cluster_packages(), python="3.11.7"),
        "node": report(good_cluster_packages(), python="3.12.1"),
    }
    (problem,) = E.compare_environments(HERE, cluster)
    assert problem.package == "python" and "3.12.1" in problem.found


def test_release_reads_local_and_pre_release_versions():
    assert E.release("2.13.0+cpu", 2) == (2, 13)
    assert E.release("5.0.0rc1", 3) == (5, 0, 0)
    assert E.release("15", 3) == (15, 0, 0)


def test_message_names_places_problems_and_both_fixes():
    packages = good_cluster_packages()
    packages.update(rich=None, transformers="4.57.1")
    recipe = minimal_recipe(
        cluster={"target": "ray", "address": "http://head:8265", "pip": ["sentencepiece"]}
    )
    problems = E.compare_environments(HERE, {"job driver (/usr/bin/python)": report(packages)})
    message = E.explain(problems, "http://head:8265", recipe)
    assert "the Ray cluster at http://head:8265 cannot run this job" in message
    assert "job driver (/usr/bin/python):\n    - transformers: 4.57.1" in message
    assert "- rich: missing (needs >=13)" in message
    assert "docker/Dockerfile" in message and "cluster.image" in message
    assert 'cluster.pip: ["sentencepiece", "rich>=13", "transformers==5.23.0"]' in message
    assert "FTLAUNCH_SKIP_ENV_CHECK=1" in message


def test_error_is_bad_input_and_a_target_error():
    assert issubclass(E.ClusterEnvError, BadInputError)
    assert issubclass(E.ClusterEnvError, TargetError)


def test_skip_variable_skips_without_touching_the_cluster():
    def no_submit(*args):
        raise AssertionError("the probe must not run")

    E.check_cluster_env(object(), minimal_recipe(), no_submit, {"FTLAUNCH_SKIP_ENV_CHECK": "1"})


def test_probe_reports_this_python_without_importing():
    found = envprobe.probe({"pyyaml": "yaml", "no-such-dist": "no_such_module_xyz"})
    assert found["packages"]["no-such-dist"] is None
    assert found["packages"]["pyyaml"] == E.local_versions({"pyyaml": "yaml"})["pyyaml"]
    assert found["executable"] == sys.executable


def test_probe_entrypoint_runs_as_a_plain_python_command(tmp_path):
    """The entrypoint the cluster runs, here, through a shell: one report line, no ray needed."""
    packages = {"pyyaml": "yaml", "rich": "rich"}
    entrypoint = E.probe_entrypoint(packages).replace("python", sys.executable, 1)
    # a Python without ray reports the driver and why the nodes could not be reached
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"}
    (tmp_path / "ray.py").write_text("raise ImportError('no ray here')\n")
    proc = subprocess.run(entrypoint, shell=True, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    parsed = E.parse_report(proc.stdout)
    assert parsed["driver"]["packages"]["pyyaml"] is not None
    assert "no ray here" in parsed["nodes_error"]


def test_no_report_in_the_logs_is_explained():
    class Client:
        def get_job_status(self, job_id):
            return type("S", (), {"value": "FAILED"})()

        def get_job_logs(self, job_id):
            return "/bin/sh: 1: python: not found\n"

        def delete_job(self, job_id):
            self.deleted = job_id

    class Cluster:
        address = "http://head:8265"
        client = Client()

    submitted = {}

    def submit(cluster, entrypoint, runtime_env, job_id, metadata):
        submitted.update(entrypoint=entrypoint, runtime_env=runtime_env, job_id=job_id)
        return job_id

    recipe = minimal_recipe(cluster={"target": "ray", "address": "http://h:8265", "pip": ["rich"]})
    with pytest.raises(
        E.ClusterEnvError, match=r"(?s)could not run the environment check.*not found"
    ):
        E.check_cluster_env(Cluster(), recipe, submit, {})
    assert submitted["runtime_env"] == {"pip": ["rich"]}
    assert submitted["entrypoint"].startswith("python -c ")
    assert Cluster.client.deleted == submitted["job_id"]
