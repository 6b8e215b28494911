"""Shared fixtures: one Ray instance per test session, tiny models, generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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

    from launcher.raysession import ray_job_env

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": ray_job_env()},
        )
    yield ray
    # Ray is shut down at interpreter exit; other session fixtures may still need it.


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
