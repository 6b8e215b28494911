"""The prepared-dataset cache: tokenized splits written once as Parquet, read by later runs.

An entry is a directory `<cache root>/<fingerprint>/` holding one folder of Parquet files per
split and `prepared.json` (rows, tokens, raw rows and sources per split, the fingerprint's
inputs, when it was made). The fingerprint covers everything that changes the tokenized output:
the sources (path, size, modification time of every file; etag / mtime of URIs where the
filesystem gives them; the `datasets` cache files of an `hf:` split), the tokenizer (class and
a hash of its full definition) and every data setting (format, fields, templates, max_length,
packing, split fractions and seed, balance, mixing weights, the labels, train.seed). A changed
input is a new entry, never a stale read.

Entries are written into a temporary directory and renamed into place in one step, with
`prepared.json` written last: a crash leaves at most a `.tmp-*` directory that no lookup reads.
A hit reads small entries (up to READ_HERE_BYTES) with pyarrow in the driver. Larger ones are
not materialized: Ray Data read tasks that reserve no CPU stream their Parquet row groups to the
training workers, so the object store does not hold the whole data, and the reads are scheduled
even when the training workers hold every CPU (the 2-core hang in DESIGN.md: a task that needs a
CPU would wait forever; `ray.data.read_parquet` is not used for this, as its file-listing step
takes a CPU whatever `num_cpus` says). The step plan's row and token counts come from
`prepared.json`, not from a pass over the data.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.data import SPLITS, PreparedData, prepare_data
from launcher.hf_files import HubSplit, loaded_datasets
from launcher.records import DataError, is_glob, local_path
from launcher.source_files import is_remote, uri_files
from launcher.stream_data import StreamPlan, hub_splits, source_paths, stream_plan, write_splits

CACHE_FORMAT = 1
"""Bumped whenever the layout of an entry or the meaning of its columns changes."""
META_FILE = "prepared.json"
# Entries up to this size on disk are read by the driver itself: Ray Data read tasks would
# start worker processes (seconds each) to read what pyarrow reads here in milliseconds.
READ_HERE_BYTES = 64 * 2**20
DEFAULT_ROOT = ".cache/ftlaunch/prepared"


# ------------------------------------------------------------------------------ where


def cache_root(recipe: Any) -> Path:
    """data.cache_dir, or ~/.cache/ftlaunch/prepared (beside the distillation cache).

    Not under checkpoint.storage_path: that directory holds run directories only, and tools
    and tests that list it expect nothing else there."""
    configured = getattr(recipe.data, "cache_dir", None)
    if configured:
        return _local_path(configured, "data.cache_dir")
    return Path.home() / DEFAULT_ROOT


def _local_path(value: str, setting: str) -> Path:
    if is_remote(value):
        raise DataError(
            f"{setting}: {value} is a URI; the prepared-dataset cache needs a path every node "
            "can read (a local or shared filesystem path, or file://)"
        )
    return local_path(value)


# ------------------------------------------------------------------------ fingerprint


def fingerprint(recipe: Any, tokenizer: Any, base_dir: Path | None = None) -> tuple[str, dict]:
    """The cache key of the recipe's prepared data and the inputs it was computed from."""
    hub = hub_splits(recipe)
    return _fingerprint(recipe, tokenizer, base_dir, _plan(recipe, base_dir, hub), hub)


def _fingerprint(
    recipe: Any,
    tokenizer: Any,
    base_dir: Path | None,
    plan: StreamPlan | None,
    hub: dict[str, HubSplit],
) -> tuple[str, dict]:
    inputs = {
        "format": CACHE_FORMAT,
        "data": _data_settings(recipe),
        "task": recipe.model.task,
        "labels": list(recipe.model.labels or ()),
        "seed": recipe.train.seed,
        "tokenizer": tokenizer_identity(tokenizer),
        "sources": {
            split: [
                _source_state(path, base_dir, hub)
                for path in source_paths(getattr(recipe.data, split))
            ]
            for split in SPLITS
            if getattr(recipe.data, split) is not None
        },
    }
    if plan is not None:  # other (hash-based) splits than the driver path's
        inputs["prepared_by"] = "tasks"
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], inputs


def _plan(recipe: Any, base_dir: Path | None, hub: dict[str, HubSplit]) -> StreamPlan | None:
    """The tasks' plan for the recipe's data, None for the driver path. A local file that
    cannot be listed fails later with the driver path's own message; remote sources only the
    tasks read, so their listing error (no access, nothing there) is the one to show, now."""
    try:
        return stream_plan(recipe, base_dir, hub)
    except DataError:
        specs = [getattr(recipe.data, split) for split in SPLITS]
        if any(is_remote(p) for spec in specs if spec is not None for p in source_paths(spec)):
            raise
        return None


def streams(slot: CacheLookup) -> bool:
    """Whether the slot's entry is prepared by Ray Data tasks (launcher.stream_data): the
    driver then reads no rows itself."""
    return slot.inputs.get("prepared_by") == "tasks"


def _data_settings(recipe: Any) -> dict:
    settings = recipe.data.model_dump(mode="json", exclude={"cache_dir"})
    template = settings.get("chat_template")
    if isinstance(template, str) and Path(template).expanduser().is_file():
        settings["chat_template"] = _file_hash(Path(template).expanduser())
    return settings


def tokenizer_identity(tokenizer: Any) -> dict:
    """Class and a hash of everything that decides the token ids the tokenizer produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "pad_token_id": tokenizer.pad_token_id,
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest = hashlib.sha256(definition.encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return {"class": type(tokenizer).__name__, "hash": digest.hexdigest()[:20]}


def _source_state(spec: str, base_dir: Path | None, hub: dict[str, HubSplit]) -> dict:
    """What identifies a source's current content without reading it."""
    if spec.startswith("hf:"):
        return {"source": spec, "files": [[f.path, f.size, f.mtime_ns] for f in hub[spec].files]}
    if is_remote(spec):
        return {"source": spec, "files": _uri_files(spec)}
    path = local_path(spec, base_dir)
    if is_glob(spec):
        files = glob.glob(str(path), recursive=True)
        return {"source": str(path), "files": [_file_state(Path(p), p) for p in sorted(files)]}
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"source": str(path), "files": [_file_state(p, _name(p, path)) for p in files]}


def _name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else path.name


def _file_state(path: Path, name: str) -> list:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [name, None, None]  # reading it fails with a DataError later
    return [name, stat.st_size, stat.st_mtime_ns]


def _uri_files(uri: str) -> list:
    """Size and mtime (and etag when the filesystem reports one) of the files under a URI."""
    try:
        _, infos = uri_files(uri)
    except Exception as exc:  # unreachable store: the read fails with its own message later
        return [f"unlisted: {type(exc).__name__}"]
    return [[i.path, i.size, i.mtime_ns, getattr(i, "etag", None)] for i in infos]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


# ------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class CacheLookup:
    """A recipe's cache slot: where it lives, its key, and the entry when one exists."""

    root: Path
    fingerprint: str
    inputs: dict
    meta: dict | None
    plan: StreamPlan | None = None
    """The tasks' plan when they prepare the data (see streams()), listed once per lookup."""
    hub: dict[str, HubSplit] = field(default_factory=dict)
    """The recipe's hf: splits, loaded once per lookup."""

    @property
    def hf_datasets(self) -> dict[str, Any]:
        """The loaded `datasets.Dataset` of each hf: source, for data.load_tables."""
        return loaded_datasets(self.hub)

    @property
    def path(self) -> Path:
        return self.root / self.fingerprint

    @property
    def hit(self) -> bool:
        return self.meta is not None


def lookup(recipe: Any, tokenizer: Any, base_dir: Path | None = None) -> CacheLookup:
    """Fingerprint the recipe's data and find its entry (no Ray, no reading of the data)."""
    root = cache_root(recipe)
    hub = hub_splits(recipe)
    plan = _plan(recipe, base_dir, hub)
    key, inputs = _fingerprint(recipe, tokenizer, base_dir, plan, hub)
    return CacheLookup(root, key, inputs, read_meta(root / key), plan, hub)


def read_meta(entry: Path) -> dict | None:
    """An entry's metadata; None when the entry is absent or not complete."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if meta.get("cache_format") != CACHE_FORMAT:
        return None
    if not all((entry / split).is_dir() for split in meta.get("splits", {})):
        return None
    return meta


def entry_size(entry: Path) -> int:
    """Bytes on disk of an entry."""
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def write_entry(slot: CacheLookup, data: PreparedData) -> dict:
    """Write data's materialized splits as a new entry; returns its metadata.

    The splits stream block by block from the object store into Parquet files (in block order,
    so a later read sees the rows in the same order); the driver holds one block at a time.
    """
    import pyarrow.parquet as pq

    tmp = _new_tmp(slot)
    try:
        for split, ds in data.datasets.items():
            folder = tmp / split
            folder.mkdir(parents=True)
            for i, block in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
                if block.num_rows:
                    pq.write_table(block, folder / f"part-{i:05d}.parquet")
        runs = data.tokenization_runs()
        splits = {
            split: _split_meta(
                data.num_rows[split],
                data.num_tokens[split],
                data.raw_rows[split],
                runs.get(split, {}).get("rows_in", 0) - runs.get(split, {}).get("rows_out", 0),
                data.dropped.get(split, {}),
            )
            for split in data.datasets
        }
        return _commit(slot, tmp, splits, data.sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_streamed_entry(slot: CacheLookup, plan: StreamPlan, recipe: Any, tokenizer: Any) -> dict:
    """Prepare the plan's pieces in Ray Data tasks that write straight into a new entry (see
    launcher.stream_data); returns its metadata. Bad data leaves no entry behind."""
    tmp = _new_tmp(slot)
    try:
        counts = write_splits(plan, recipe, tokenizer, tmp)
        splits = {
            split: _split_meta(
                c["rows_out"],
                c["tokens_out"],
                c["rows_in"],
                c["rows_in"] - c["rows_out"],
                {k.removeprefix("dropped_"): v for k, v in c.items() if k.startswith("dropped_")},
                tokenization={k: v for k, v in c.items() if not k.startswith("dropped_")},
            )
            for split, c in counts.items()
        }
        return _commit(slot, tmp, splits, plan.sources, streamed=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_tmp(slot: CacheLookup) -> Path:
    slot.root.mkdir(parents=True, exist_ok=True)
    return slot.root / f".tmp-{slot.fingerprint}-{uuid.uuid4().hex[:8]}"


def _split_meta(
    rows: int, tokens: int, raw_rows: int, dropped: int, reasons: dict, **extra: Any
) -> dict:
    return {
        "rows": rows,
        "tokens": tokens,
        "raw_rows": raw_rows,
        "dropped": dropped,
        "dropped_by_reason": reasons,
        **extra,
    }


def _commit(slot: CacheLookup, tmp: Path, splits: dict, sources: list[str], **extra: Any) -> dict:
    """Write prepared.json last and rename the finished entry into place in one step."""
    meta = {
        "cache_format": CACHE_FORMAT,
        "fingerprint": slot.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": splits,
        "sources": sources,
        "inputs": slot.inputs,
        **extra,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    try:
        os.rename(tmp, slot.path)
    except OSError:
        if read_meta(slot.path) is None:  # not a finished entry written meanwhile
            raise
    return meta


def read_entry(slot: CacheLookup, read_here_bytes: int | None = None) -> PreparedData:
    """The entry's splits as Ray Datasets (read here, or streamed by read tasks above
    `read_here_bytes`, default READ_HERE_BYTES), counts from its metadata."""
    import ray

    # The read tasks run where the driver runs: the entry may be on a disk only this node sees.
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    meta = slot.meta or {}
    files = {
        split: sorted(str(p) for p in (slot.path / split).glob("*.parquet"))
        for split in meta["splits"]
    }
    limit = READ_HERE_BYTES if read_here_bytes is None else read_here_bytes
    small = sum(os.path.getsize(f) for names in files.values() for f in names) <= limit
    datasets = {}
    for split, names in files.items():
        if small:
            datasets[split] = ray.data.from_blocks(_read_parquet_here(names))
            continue
        # Streamed to the workers as they train, not held in the object store: the read tasks
        # reserve no CPU, so they run beside workers that hold every CPU (no 2-core hang).
        # Not ray.data.read_parquet: its file-listing step takes a CPU whatever num_cpus says.
        paths = ray.data.from_items(
            [{"path": name} for name in names], override_num_blocks=min(len(names), 200)
        )
        datasets[split] = paths.map_batches(
            _read_parquet_files, batch_size=1, batch_format="pyarrow", num_cpus=0, resources=here
        )
    splits = meta["splits"]
    return PreparedData(
        datasets=datasets,
        num_rows={k: v["rows"] for k, v in splits.items()},
        num_tokens={k: v["tokens"] for k, v in splits.items()},
        raw_rows={k: v["raw_rows"] for k, v in splits.items()},
        sources=list(meta.get("sources", [])),
        dropped={
            k: v["dropped_by_reason"] for k, v in splits.items() if v.get("dropped_by_reason")
        },
        cache=cache_facts(slot, reused=True),
    )


def _read_parquet_files(batch: Any) -> Iterator[Any]:
    """A read task's rows: its files' row groups, one block each."""
    import pyarrow.parquet as pq

    for name in batch.column("path").to_pylist():
        reader = pq.ParquetFile(name)
        for group in range(reader.num_row_groups):
            yield reader.read_row_group(group)


def _read_parquet_here(files: list[str]) -> list:
    """One Arrow table per file, in file order: the blocks the entry was written from, so a
    run on a hit sees the blocks (and with them the shuffled order) of the run that wrote it."""
    import pyarrow.parquet as pq

    return [pq.read_table(f, partitioning=None) for f in files]


def cache_facts(slot: CacheLookup, *, reused: bool) -> dict:
    """What the summary and the display say about the cache."""
    return {"fingerprint": slot.fingerprint, "path": str(slot.path), "reused": reused}


# ------------------------------------------------------------------------------ the stage


def load_or_prepare(
    slot: CacheLookup,
    recipe: Any,
    tokenizer: Any,
    *,
    tables: dict | None = None,
    base_dir: Path | None = None,
) -> PreparedData:
    """The entry's data on a hit; otherwise tokenize with Ray Data and write the entry.

    Needs a running Ray. On a miss the materialized datasets are used directly (no re-read),
    except for large sources (launcher.stream_data): tasks write the entry, which is then read
    as a hit is.
    """
    if slot.hit:
        return read_entry(slot)
    plan = None if tables is not None else slot.plan
    if plan is not None:
        written = replace(slot, meta=write_streamed_entry(slot, plan, recipe, tokenizer))
        data = read_entry(written, read_here_bytes=0)  # large data never passes the driver
        data.tokenization = {
            split: meta.get("tokenization", {}) for split, meta in written.meta["splits"].items()
        }
        data.cache = cache_facts(slot, reused=False)
        return data
    data = prepare_data(recipe, tokenizer, base_dir=base_dir, tables=tables)
    write_entry(slot, data)
    data.cache = cache_facts(slot, reused=False)
    return data
