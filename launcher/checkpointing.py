"""Worker-side checkpoints on Ray Train: written to a local directory, uploaded to the run's
storage (while training goes on, or before the next step), marked complete rank by rank, and
taken at once when Ray announces that a node will be preempted.

A checkpoint counts only when it is complete: Ray Train registers one after every rank's
upload, and each rank leaves a marker (`rundir.rank_marker`) after its own files, so a scan of
the run directory (`rundir.latest_checkpoint`, used by `--resume` and by a restart that comes
before Ray registered the newest) passes over one a killed worker left half-written.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.rundir import checkpoint_dir_name, rank_marker

# Ray Train's own watcher reads the cluster's drain state every RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S
# (raysession sets 1 s); asking it more often than about once a second adds nothing but its
# cost, a round trip through Ray Train's synchronization actor on every rank.
PREEMPTION_POLL_S = 1.0
MAX_POLL_INTERVAL_STEPS = 1_000


def group_token() -> str:
    """One token per worker group, the same on every rank: rank 0 draws it, every rank gets it."""
    import ray.train.collective

    return ray.train.collective.broadcast_from_rank_zero(uuid.uuid4().hex)


@dataclass
class CheckpointWriter:
    """Saves a checkpoint through `save` and reports it to Ray Train, which stores it under the
    run's checkpoints/ and registers it once every rank's upload is done."""

    rank: int
    token: str
    async_upload: bool

    def stamp(self) -> dict[str, Any]:
        """What rank 0 adds to the checkpoint state so completeness can be told from the files
        (with the world size the state records anyway)."""
        return {"token": self.token}

    def report(
        self,
        metrics: dict[str, Any],
        step: int,
        save: Callable[[Path], None],
        wait_for_upload: bool = False,
    ) -> None:
        """Write this rank's part into a fresh local directory and hand it to Ray Train.

        Asynchronously, the call returns once the local copy is written; Ray uploads it in a
        background thread, deletes it afterwards, and a worker that ends waits for its uploads.
        `wait_for_upload` forces the synchronous path (a checkpoint before a preemption).
        """
        import ray.train

        directory = Path(tempfile.mkdtemp(prefix="ftlaunch-ckpt-"))
        save(directory)
        background = self.async_upload and not wait_for_upload
        mode = (
            ray.train.CheckpointUploadMode.ASYNC
            if background
            else ray.train.CheckpointUploadMode.SYNC
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=checkpoint_dir_name(step),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=self.upload,
        )
        if not background:  # gone after the upload, unless Ray skipped the report
            shutil.rmtree(directory, ignore_errors=True)

    def upload(self, checkpoint, name: str):
        """Store this rank's files, then its marker: the marker is the last thing written."""
        stored = self.store(checkpoint, name)
        self.mark_complete(stored)
        return stored

    def store(self, checkpoint, name: str):
        """Ray Train's own copy into the run's storage (pyarrow, with its retries).

        The one place ftlaunch goes below Ray Train's public API: `get_storage()` is a
        DeveloperAPI, and its StorageContext does the copy Ray would do without an upload
        function. Writing the marker needs the upload function, and the function then owns the
        copy too.
        """
        import ray.train

        storage = ray.train.get_context().get_storage()
        return storage.persist_current_checkpoint(checkpoint, name)

    def mark_complete(self, stored) -> None:
        with stored.filesystem.open_output_stream(f"{stored.path}/{rank_marker(self.rank)}") as out:
            out.write(self.token.encode())


@dataclass
class PreemptionWatch:
    """Asks Ray Train whether a node of this worker group is about to be preempted, about once
    a second, on the same steps on every rank (the question is a collective).

    `share` gives every rank rank 0's value; rank 0 times the steps between two questions and
    sets the interval in steps to the next one from it.
    """

    rank: int
    share: Callable[[float], float]
    next_step: int = 1
    last_step: int = 0
    last_time: float | None = None

    def check(self, step: int):
        """The announced preemption (a ray.train.PreemptionInfo), or None when there is none
        or it is not time to ask."""
        if step < self.next_step:
            return None
        import ray.train

        info = ray.train.get_preemption_info()
        self.next_step = step + int(self.share(float(self.interval(step))))
        return info

    def interval(self, step: int) -> int:
        """Steps until the next question (rank 0's clock; other ranks' values are not used)."""
        now = time.perf_counter()
        last_time, last_step = self.last_time, self.last_step
        self.last_time, self.last_step = now, step
        if self.rank != 0:
            return 0
        if last_time is None or step <= last_step:
            return 1
        per_step = max((now - last_time) / (step - last_step), 1e-6)
        return max(1, min(MAX_POLL_INTERVAL_STEPS, int(PREEMPTION_POLL_S / per_step)))


def preemption_event(info, step: int) -> dict[str, Any]:
    """The channel event of a checkpoint taken for a preemption."""
    return {
        "event": "preemption",
        "step": step,
        "nodes": list(info.preempted_node_ids),
        "ranks": list(info.preempted_ranks),
        "deadline_ms": info.deadline_ms,
    }


def wait_for_replacement() -> None:
    """Idle until Ray Train ends this worker group (when the node goes, or at the deadline) and
    starts a new one from the checkpoint just taken: steps trained meanwhile would be lost with
    the group. Returning would end the run as finished."""
    while True:
        time.sleep(1.0)
