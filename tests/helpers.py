"""Recipe builders the test modules share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import yaml

from launcher.recipe import Recipe, validate_data

MINIMAL_YAML = """\
name: demo
model:
  name_or_path: gpt2
data:
  train: data/train.jsonl
"""


def minimal_recipe(**sections: Any) -> Recipe:
    """A valid recipe naming a hub model and a train file; `sections` replace whole sections."""
    data: dict[str, Any] = {
        "name": "tiny-job",
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.jsonl"},
    }
    data.update(sections)
    return validate_data(data)


def job_body(
    tmp_path: Path,
    model: Path,
    files: dict[str, Path],
    *,
    name: str,
    train: dict[str, Any],
    checkpoint: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A two-worker job on a tiny model and generated train/validation files (32 tokens), runs
    stored under tmp_path/runs; `checkpoint` adds to the checkpoint section, `sections` add
    whole sections."""
    return {
        "name": name,
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(files["train"]),
            "validation": str(files["validation"]),
            "max_length": 32,
        },
        "train": train,
        "scaling": {"num_workers": 2},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), **(checkpoint or {})},
        **sections,
    }


def write_recipe(directory: Path, body: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(body))
    return path


def lm_job_recipe(
    tmp_path: Path,
    model: Path,
    files: dict[str, Path],
    *,
    name: str,
    workers: int = 2,
    checkpoint: dict[str, Any] | None = None,
    **train: Any,
) -> Path:
    """job_body's causal-LM job written as a recipe: batch 4, lr 3e-3, a log line every step,
    a checkpoint every 2 steps, all kept; `train` and `checkpoint` add to those."""
    body = job_body(
        tmp_path,
        model,
        files,
        name=name,
        train={"batch_size": 4, "lr": 3e-3, "log_every": 1, **train},
        checkpoint={"every": 2, "metric": None, "keep": None, **(checkpoint or {})},
    )
    body["scaling"]["num_workers"] = workers
    return write_recipe(tmp_path, body)


def start_driver(recipe: Path, cwd: Path, env: dict[str, str], out: IO | int = subprocess.PIPE):
    """`python -m launcher.job RECIPE` in its own session (a test may signal or kill its whole
    process group), output and errors together in `out`."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.job", str(recipe)],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def join_gloo_group(rank: int, world: int, port: int) -> None:
    """In a spawned test process: the rank's launcher environment, one torch thread, and the
    gloo process group of `world` ranks on localhost:`port`."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run_python(script: str) -> subprocess.CompletedProcess:
    """`python -c script` in a fresh interpreter with the repository importable, as a user's
    process would start: what it prints, untouched by this test session's setup. It must
    succeed."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
