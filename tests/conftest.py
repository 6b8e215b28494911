"""Shared fixtures: one Ray instance per test session, tiny models, generated data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from raycluster import CLUSTER_HF_TOKEN, LocalCluster, S3Server

# Quiet, deterministic and offline, before any library reads its environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller takes a worker's checkpoint report only when it polls the worker
# (launcher.raysession.ray_job_env): polling four times a second instead of once cuts the wait at each
# checkpoint and at the end of every test job from up to 1 s to up to 0.25 s. Throughput, the
# price of frequent polls, does not matter here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (started on first use).

    Ray's CPU count is logical: 4 lets two training workers and the data tasks that feed
    them be scheduled together on this 2-core machine.
    """
    import ray

    from launcher.raysession import environment, ray_job_env

    for attempt in range(2):  # Ray gives a node 30 s to register: a busy machine gets two tries
        if ray.is_initialized():
            break
        try:
            # As ftlaunch's own embedded Ray: the job's environment is the node's, so no worker
            # the tests' drivers start pays for a runtime_env (launcher.raysession).
            with environment(ray_job_env(embedded=True)):
                ray.init(
                    num_cpus=4,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        except Exception:
            ray.shutdown()
            if attempt == 1:
                raise
    yield ray
    # Ray is shut down at interpreter exit; other session fixtures may still need it.


def pytest_collection_modifyitems(config, items) -> None:
    """The tests on the multi-node cluster run last, one after another: the cluster starts on
    first use and stays up until the session ends, and an idle three-node cluster still takes
    a few percent of a core (heartbeats, agents, metrics) from every test run after it."""
    on_cluster = [item for item in items if "ray_cluster" in getattr(item, "fixturenames", ())]
    if on_cluster:
        rest = [item for item in items if item not in on_cluster]
        items[:] = rest + on_cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A real three-node Ray cluster (token auth, the nodes' own HF_TOKEN), started on first
    use, stopped at the end.

    The head runs the job drivers and no workers (0 CPUs, as on KubeRay). Worker nodes `node-a`
    and `node-b`: 3 CPUs each, room for one 2-CPU training worker and the data tasks that feed
    it, and a custom resource of their own name, so a test can place work on one of them (no
    `_` in these names: the dashboard reports resource names camelCased). CPUs are logical:
    two training workers and their data tasks fit on this 2-core machine. A test that kills a
    worker node puts a new one in its place (LocalCluster.replace_node) before it ends.
    """
    # Unix socket paths under the temp dir must stay short (107 bytes): not under tmp_path.
    root = Path(tempfile.mkdtemp(prefix="ftlc-", dir="/tmp"))
    cluster = LocalCluster(root, env={"HF_TOKEN": CLUSTER_HF_TOKEN})
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_node("node-a", num_cpus=3, resources={"node-a": 1})
        cluster.add_node("node-b", num_cpus=3, resources={"node-b": 1})
        cluster.wait_for_job_agent()
        # Ray Train sees a node come or go within a second instead of up to 20 s (elastic runs).
        cluster.quicken_resource_view()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def client_auth(ray_cluster, tmp_path, monkeypatch) -> Path:
    """This process talks to ray_cluster like a user: the token in a file, no token mode, no
    RAY_ADDRESS."""
    path = tmp_path / "auth_token"
    path.write_text(ray_cluster.token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto) on 127.0.0.1 with one bucket, for s3:// storage paths."""
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 with a 512-token BPE tokenizer (no pad token, like GPT-2)."""
    from launcher.dev.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with a BPE tokenizer."""
    from launcher.dev.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT encoder with a WordPiece tokenizer."""
    from launcher.dev.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "bert")


@pytest.fixture(scope="session")
def review_data(tmp_path_factory) -> dict[str, Path]:
    """Generated sentiment reviews as train/validation/test JSONL files."""
    from launcher.dev.synthetic import review_rows, write_jsonl

    root = tmp_path_factory.mktemp("reviews")
    rows = review_rows(400, seed=3)
    return {
        "train": write_jsonl(rows[:320], root / "train.jsonl"),
        "validation": write_jsonl(rows[320:360], root / "validation.jsonl"),
        "test": write_jsonl(rows[360:], root / "test.jsonl"),
    }


@pytest.fixture(scope="session")
def story_data(tmp_path_factory) -> dict[str, Path]:
    """Generated story lines as train/validation JSONL files with a `text` field."""
    from launcher.dev.synthetic import story_lines, write_jsonl

    root = tmp_path_factory.mktemp("stories")
    lines = [{"text": t} for t in story_lines(300, seed=4)]
    return {
        "train": write_jsonl(lines[:260], root / "train.jsonl"),
        "validation": write_jsonl(lines[260:], root / "validation.jsonl"),
    }


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory) -> dict[str, Path]:
    """Generated instruction rows as train/validation JSONL files."""
    from launcher.dev.synthetic import instruction_rows, write_jsonl

    root = tmp_path_factory.mktemp("instructions")
    rows = instruction_rows(200, seed=5)
    return {
        "train": write_jsonl(rows[:170], root / "train.jsonl"),
        "validation": write_jsonl(rows[170:], root / "validation.jsonl"),
    }
