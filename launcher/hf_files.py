"""`hf:` sources as the Arrow files the `datasets` library keeps them in.

`datasets` prepares a hub (or local-folder) dataset once into its cache: a split is one or more
`.arrow` files in Arrow's IPC stream format, whose schema metadata holds the dataset's features.
Resolving a split to those files lets large `hf:` sources be read the way large Parquet files
are (launcher.stream_data): by Ray Data tasks, one file per task, a batch of rows at a time, so
the driver reads no rows. The tasks open the files by path, so on a multi-node cluster the
`datasets` cache (HF_DATASETS_CACHE) must be on storage every node sees, as local data paths
must be.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from launcher.records import load_hf_split, named_class_labels


@dataclass(frozen=True)
class CacheFile:
    """One Arrow file of a split, with what identifies its content without reading it."""

    path: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return Path(self.path).name


def split_files(spec: str) -> list[CacheFile] | None:
    """The cache files that hold exactly the rows of an `hf:` split, in order; None when the
    split is not such a set of whole files (a sliced split like `train[:10%]`, or a dataset
    held in memory), which the driver then reads as a table. Raises DataError when the split
    cannot be loaded."""
    ds = load_hf_split(spec)
    paths = [entry["filename"] for entry in ds.cache_files]
    if not paths or sum(rows_in(p) for p in paths) != ds.num_rows:
        return None
    out = []
    for p in paths:
        stat = os.stat(p)
        out.append(CacheFile(p, stat.st_size, stat.st_mtime_ns))
    return out


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
        for batch in reader:
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= rows:
                yield _named(pending, features)
                pending = []
        if pending:
            yield _named(pending, features)


def _named(batches: list[pa.RecordBatch], features: Any) -> pa.Table:
    table = pa.Table.from_batches(batches).replace_schema_metadata(None)
    return named_class_labels(table, features)
