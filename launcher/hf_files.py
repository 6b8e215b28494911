"""`hf:` sources as the Arrow files the `datasets` library keeps them in.

`datasets` prepares a hub (or local-folder) dataset once into its cache: a split is one or more
`.arrow` files in Arrow's IPC stream format, whose schema metadata holds the dataset's features.
Resolving a split to those files lets large `hf:` sources be read the way large Parquet files
are (launcher.stream_data): by Ray Data tasks, one file per task, a batch of rows at a time, so
the driver reads no rows. The cache is on the driver's node, so those tasks run there
(`reader_placement`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from launcher.records import DataError, load_hf_split, named_class_labels, short_reason


@dataclass(frozen=True)
class CacheFile:
    """One Arrow file of a split, with what identifies its content without reading it."""

    path: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class HubSplit:
    files: list[CacheFile]
    whole: bool
    """Whether the files hold exactly the split's rows, in order (not a slice of them, as
    `train[:10%]` would be, and not a dataset held in memory): only then can tasks read them."""
    dataset: Any = field(default=None, compare=False, repr=False)
    """The loaded `datasets.Dataset` (memory-mapped), for the driver path to read small
    splits from without loading them again."""


def resolve_split(spec: str) -> HubSplit:
    """Load an `hf:` split (from the local cache, or downloaded and prepared by `datasets`) and
    find its cache files. Raises DataError when the split or its files cannot be loaded."""
    ds = load_hf_split(spec)
    paths = [entry["filename"] for entry in ds.cache_files]
    try:
        stats = [os.stat(p) for p in paths]
        files = [CacheFile(p, s.st_size, s.st_mtime_ns) for p, s in zip(paths, stats, strict=True)]
        rows = sum(rows_in(p) for p in paths)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{spec}: cannot read the datasets cache: {short_reason(exc)}") from None
    return HubSplit(files, bool(files) and rows == ds.num_rows, ds)


def loaded_datasets(hub: dict[str, HubSplit]) -> dict[str, Any]:
    """The `datasets.Dataset` of each resolved split, by its hf: spec (data.load_tables reads
    small splits from these instead of loading them again)."""
    return {spec: split.dataset for spec, split in hub.items()}


def rows_in(path: str) -> int:
    """Rows of an Arrow stream file (memory-mapped: no row is copied)."""
    with pa.memory_map(path) as source:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def named_tables(path: str, rows: int) -> Iterator[pa.Table]:
    """An Arrow cache file as tables of about `rows` rows each, ClassLabel ids turned into
    their label names (as the driver path's `read_hf` gives them)."""
    import datasets

    with pa.memory_map(path) as source:
        reader = pa.ipc.open_stream(source)
        features = datasets.Features.from_arrow_schema(reader.schema)
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in reader:
            pending.append(batch)
            held += batch.num_rows
            if held >= rows:
                yield _named(pending, features)
                pending, held = [], 0
        if pending:
            yield _named(pending, features)


def _named(batches: list[pa.RecordBatch], features: Any) -> pa.Table:
    table = pa.Table.from_batches(batches).replace_schema_metadata(None)
    return named_class_labels(table, features)


def reader_placement() -> tuple[int, dict[str, Any]]:
    """How many tasks read cache files at once, and the Ray options that place them: on this
    (the driver's) node, where `datasets` keeps the files, reserving no CPU (a head node may
    offer none to Ray), as many as the node has CPUs for Ray (at least one)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.util.client.ray.is_connected():
        raise DataError(
            "hf: sources larger than FTLAUNCH_STREAM_BYTES are read from the datasets cache on "
            "the driver's machine, which a Ray Client driver does not share with the cluster: "
            "submit the job with --address (Ray Jobs) instead"
        )
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    placement = NodeAffinitySchedulingStrategy(node, soft=False)
    return max(1, int(cpus)), {"num_cpus": 0, "scheduling_strategy": placement}
