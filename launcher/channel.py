"""The channel between the training workers and the driver: reports one way, stop the other.

Rank 0 puts its reports and events (metrics, parameters, resumes, preemptions) on the channel;
the driver takes them in order and writes them into the run directory. The driver raises the
stop flag on SIGTERM; rank 0 polls it on report steps.

An in-process loop shares the driver's process: `LocalChannel` is a list and a flag. Real
workers talk to one actor on the driver's node (`ActorChannel`), so the channel outlives any
worker node the cluster loses, and a job starts one helper actor, not two. A put waits until
the actor has the report: a worker's last reports must not be lost when Ray Train ends the
worker right after its loop returns.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any


class Mailbox:
    """What the channel holds: the reports not yet taken, and the stop flag."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.stop = False

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


class LocalChannel:
    """The channel of an in-process run (a lock guards the list across the driver's threads)."""

    def __init__(self) -> None:
        self._box = Mailbox()
        self._lock = threading.Lock()

    def put(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._box.put(item)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            return self._box.take()

    def request_stop(self) -> None:
        self._box.request_stop()

    def stop_requested(self) -> bool:
        return self._box.stop_requested()

    def close(self) -> None:
        """Nothing to free: the channel ends with the run's objects."""


class ActorChannel:
    """The channel of real workers: a handle to a Mailbox actor, picklable into every worker."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    @classmethod
    def beside(cls, options: dict[str, Any]) -> ActorChannel:
        """A new Mailbox actor started with `options` (the driver's node, no CPU)."""
        import ray

        return cls(ray.remote(Mailbox).options(**options).remote())

    def put(self, item: dict[str, Any]) -> None:
        import ray

        ray.get(self._actor.put.remote(item))

    def take(self) -> list[dict[str, Any]]:
        import ray

        return ray.get(self._actor.take.remote())

    def request_stop(self) -> None:
        self._actor.request_stop.remote()

    def stop_requested(self) -> bool:
        import ray

        return ray.get(self._actor.stop_requested.remote())

    def close(self) -> None:
        """End the actor (it may be gone already with a failed job: nothing left to free)."""
        import ray

        with contextlib.suppress(Exception):  # a dead actor, or a Ray already shut down
            ray.kill(self._actor)
