"""The run-directory contract: where a run lives and the names of what it holds.

<storage_path>/<name>-<timestamp>/
    recipe.yaml     the resolved recipe the run used
    metrics.jsonl   one JSON object per report (and restart events)
    checkpoints/    Ray Train checkpoints, checkpoint_<step>/ with STATE_FILE from rank 0 and
                    one completion marker per rank (rank_marker), written after its files
    model/          the exported Hugging Face model
    summary.json    status, timings, final metrics
    metrics.png     the training and evaluation curves
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "metrics.png"
# Written by rank 0 into every checkpoint: where training was (step, epoch, batches, restarts).
STATE_FILE = "ftlaunch_state.json"


@dataclass
class RunState:
    """What the driver learns about a run while it goes, for summary.json."""

    run_dir: Path
    remote: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    # rank -> {"node_id", "node_ip"} of the newest worker group
    placement: dict[int, dict[str, str]] = field(default_factory=dict)
    restarts: int = 0
    # Worker groups started (restarts and resizes each start one), the newest one's size, and
    # every change of size as {"step", "old", "new"}.
    worker_groups: int = 0
    world_size: int | None = None
    world_size_changes: list[dict[str, int]] = field(default_factory=list)
    last_step: int = -1
    replayed: int = 0
    stopped_by: str | None = None
    """The signal that stopped the run (SIGTERM, SIGINT), when one did."""
    # Node preemptions Ray announced: {"step" of the checkpoint taken, "nodes", "deadline_ms"}
    preemptions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Stopwatch:
    """Seconds spent in each stage of the driver (summary.json `timings_s`)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - begin, 3)


def is_uri(storage_path: str) -> bool:
    """s3://, gs://, file:// and other pyarrow filesystem URIs (not plain paths)."""
    return "://" in storage_path


def run_name(name: str, now: datetime | None = None) -> str:
    """<name>-<timestamp> of a new run."""
    return f"{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(name: str, storage: str, recipe_text: str) -> tuple[Path, str | None]:
    """Create the run directory of recipe `name` under `storage` with the resolved recipe in it.

    Local storage: <storage_path>/<name>-<timestamp>. URI storage: checkpoints go straight to
    <uri>/<name>-<timestamp>/checkpoints through Ray Train; the driver's own files are staged in
    a local directory and uploaded beside them at the end. Returns (local dir, remote URI).
    """
    name = run_name(name)
    remote = None
    if is_uri(storage):
        remote = f"{storage.rstrip('/')}/{name}"
        root = Path(os.environ.get("FTLAUNCH_STAGING", Path.home() / ".cache/ftlaunch/staging"))
    else:
        root = Path(os.path.expanduser(storage)).resolve()
    run_dir, suffix = root / name, 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{name}-{suffix}"
    if remote is not None and suffix > 1:
        remote = f"{remote}-{suffix}"
    run_dir.mkdir(parents=True)
    (run_dir / RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
    return run_dir, remote


def upload_run_dir(run_dir: Path, remote: str) -> None:
    """Copy the driver's files (model, metrics, summary, ...) next to the remote checkpoints."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(remote)
    fs.create_dir(base, recursive=True)
    pafs.copy_files(
        str(run_dir), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def metrics_path(run_dir: Path | str) -> Path:
    """The run's metrics.jsonl."""
    return Path(run_dir) / METRICS_FILE


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every report in metrics.jsonl (none when the run has not reported yet)."""
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints_dir(run_dir: Path | str) -> Path:
    """Where Ray Train writes the run's checkpoints."""
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_step(checkpoint_dir: Path | str) -> int:
    """The optimizer step a checkpoint directory was saved at."""
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())["step"]


def checkpoint_dir_name(step: int) -> str:
    """checkpoint_<step:06d>: the name of every checkpoint in the run's checkpoints/."""
    return f"checkpoint_{step:06d}"


def rank_marker(rank: int) -> str:
    """The file a rank writes into a checkpoint once all its own files are stored."""
    return f".ftlaunch-rank{rank}-complete"


def checkpoint_complete(checkpoint_dir: Path | str) -> bool:
    """Whether every rank finished writing this checkpoint.

    Rank 0's state names the world size and a token of the worker group that wrote it; each
    rank writes the token into its marker after its files. A marker from an earlier group (a
    checkpoint of the same step begun before a restart) holds another token. A state without a
    token was written whole before it got its name (in-process runs, older checkpoints).
    """
    directory = Path(checkpoint_dir)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    token = state.get("token")
    if token is None:
        return True
    for rank in range(int(state.get("world_size", 1))):
        try:
            if (directory / rank_marker(rank)).read_text() != token:
                return False
        except OSError:
            return False
    return True


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The complete checkpoint with the highest step in a run directory, if any (one that a
    killed worker left half-written is passed over)."""
    found = []
    for state in checkpoints_dir(run_dir).glob(f"checkpoint_*/{STATE_FILE}"):
        if not checkpoint_complete(state.parent):
            continue
        try:
            found.append((checkpoint_step(state.parent), state.parent))
        except (OSError, ValueError, KeyError):
            continue
    return max(found)[1] if found else None
