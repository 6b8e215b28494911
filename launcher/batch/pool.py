"""Running a job over a Ray Data actor pool and streaming its results to a file.

`map_batches` runs the input chunks through a pool of actors that each load the model once (one
actor per GPU when there are GPUs, CPU actors otherwise). The driver streams results to the output
file as they arrive, so memory stays flat however many rows there are.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.batch.inputs import INTERNAL_PREFIX, BatchInputError
from launcher.batch.source import ModelSource, scoring_tokenizer
from launcher.batch.worker import BatchWorker
from launcher.progress import progress_display
from launcher.raysession import in_process_allowed, quiet_ray_data

# Model batches per actor call: rows are sorted by length within this window.
BUCKET_BATCHES = 8
# Up to this many rows on a cluster without GPUs, one BatchWorker runs in this process: starting
# a pool actor (a process that imports torch and loads the model) costs more than the scoring.
IN_DRIVER_ROWS = 1_000
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class PoolOptions:
    """Actor pool and batch sizes; unset num_actors means one per GPU, or one CPU actor."""

    batch_size: int = 32
    num_actors: int | None = None
    cpus_per_actor: float = 1
    progress: bool = True
    address: str | None = None


def run_job(
    source: ModelSource,
    dataset,
    job: dict,
    pool: PoolOptions,
    total: int | None,
    description: str,
) -> Iterator:
    """Run `job` over a Ray dataset on an actor pool; yield result blocks (pyarrow) as they land."""
    import ray.data

    # Load the tokenizer here first: a broken model directory is then a clear error in the
    # driver rather than a failure inside every actor.
    scoring_tokenizer(source)
    gpus = _cluster_gpus()
    actors = pool.num_actors or max(gpus, 1)
    job = {**job, "batch_size": pool.batch_size}
    if runs_in_driver(total, actors, gpus, pool.address):
        yield from run_in_driver(source, dataset, job, pool, total, description)
        return
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only among the extra remote args it has deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        mapped = dataset.map_batches(
            BatchWorker,
            fn_constructor_kwargs={"source": source, "job": job},
            batch_size=pool.batch_size * BUCKET_BATCHES,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=pool.cpus_per_actor,
            num_gpus=1 if gpus else 0,
            **actor_restarts(),
        )
    # Our own display below shows rows/s and ETA; the dataset carries its own context copy.
    mapped.context.enable_progress_bars = False
    # Results in input order (generations follow the prompts file); costs little with one
    # operator, since actors already take blocks in order.
    mapped.context.execution_options.preserve_order = True
    quiet_ray_data(verbose=False)
    with progress_display(total, description, pool.progress) as advance:
        for block in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            advance(block.num_rows)
            yield block


def runs_in_driver(total: int | None, actors: int, gpus: int, address: str | None) -> bool:
    """Whether a job is small enough to run in this process rather than on an actor pool.

    Not with GPUs (the pool places the model on them), not when more actors were asked for,
    not through Ray Client (the model path is the cluster's, not this machine's).
    """
    if not in_process_allowed() or gpus or actors != 1:
        return False
    remote = address or os.environ.get("RAY_ADDRESS", "")
    return total is not None and total <= IN_DRIVER_ROWS and not remote.startswith("ray://")


def run_in_driver(
    source: ModelSource, dataset, job: dict, pool: PoolOptions, total: int | None, description: str
) -> Iterator:
    """run_job's pool work done by one BatchWorker here: the same batches in the same order,
    turned into Arrow blocks the way Ray Data turns an actor's output into a block."""
    from ray.data.block import BlockAccessor

    dataset.context.execution_options.preserve_order = True
    quiet_ray_data(verbose=False)
    worker = BatchWorker(source=source, job=job)
    batches = dataset.iter_batches(
        batch_size=pool.batch_size * BUCKET_BATCHES, batch_format="pandas"
    )
    with progress_display(total, description, pool.progress) as advance:
        for batch in batches:
            block = BlockAccessor.for_block(BlockAccessor.batch_to_block(worker(batch))).to_arrow()
            advance(block.num_rows)
            yield block


def actor_restarts() -> dict:
    """Ray Data restarts a pool actor without limit; on one node that only repeats what killed
    it (out of memory, a crash in the model code), and asking for it makes Ray log an error
    line about the actor's constructor arguments on every run. Across nodes a lost node is
    worth the restart."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return {"max_restarts": 0} if nodes <= 1 else {}


class OutputWriter:
    """Appends result blocks to a .jsonl or .parquet file; the file appears only when complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in OUTPUT_SUFFIXES:
            raise BatchInputError(
                f"output {self.path}: unsupported type {self.suffix or '(none)'}; allowed: "
                + ", ".join(OUTPUT_SUFFIXES)
            )
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.rows = 0
        self._handle = None
        self._parquet = None
        self._schema = None

    def __enter__(self) -> OutputWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.suffix == ".jsonl":
            self._handle = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, table) -> None:
        table = _public_columns(table)
        if self.suffix == ".jsonl":
            for row in table.to_pylist():
                self._handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            self._write_parquet(table)
        self.rows += table.num_rows

    def _write_parquet(self, table) -> None:
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.partial, table.schema)
            self._schema = table.schema
        elif table.schema != self._schema:
            # Blocks may differ where a column was all null in one of them.
            try:
                table = table.select(self._schema.names).cast(self._schema)
            except (KeyError, ValueError, TypeError) as exc:
                raise BatchInputError(
                    f"output {self.path}: rows do not share one schema ({exc}); write .jsonl instead"
                ) from None
        self._parquet.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._parquet is not None:
            self._parquet.close()
        elif self.suffix == ".parquet" and exc_type is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self.partial)
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def _public_columns(table):
    hidden = [n for n in table.column_names if n.startswith(INTERNAL_PREFIX) or n.startswith("__")]
    return table.drop_columns(hidden) if hidden else table


def dataset_from_refs(refs: list, where: str):
    import ray.data

    if not refs:
        raise BatchInputError(f"{where}: no rows to process")
    return ray.data.from_arrow_refs(refs)
