"""Streamed preparation of large data: Ray Data tasks read, validate, split, tokenize and write.

When the sources of a recipe hold more than `stream_bytes()` bytes on disk, or any is an s3:// /
gs:// URI, the driver never reads a row. It lists the files (of an `hf:` split: its `datasets`
cache files, launcher.hf_files) and cuts them into pieces for Ray Data tasks:

- JSON Lines files are cut into byte ranges of about `PIECE_BYTES`, at line boundaries (a line
  belongs to the piece that holds its first byte); Parquet and `hf:` cache files are a piece
  each, read a batch of rows at a time; CSV/TSV, JSON arrays and .txt files are a piece each,
  read whole by the task.
- Each task validates its rows with the driver path's own code (`data.canonical_columns`,
  `data.read_file`), so bad data raises DataError naming the file, the line (counted only when a
  row is bad) or Parquet row, and the field; `data.data_error_in` unwraps it from Ray's errors.
- Splits: a carved row goes to test, validation or train by a stable hash of its key (seed, source
  name, file path relative to the source, row locator: the line's byte offset for JSON Lines, the
  row index otherwise) against `data.split` fractions: the same row lands in the same split at
  any size and on any machine, with no shuffle in memory.
- Mixing and balancing: a counting pass (the same tasks, validating only) gives the training rows
  per source and label; each training row is then repeated floor(f) or floor(f) + 1 times (a
  hash decides which) with f = target share / rows of its source, and each copy is kept with
  probability smallest class / its class when `data.balance` is on. The counts match the driver
  path's in expectation, not to the row.
- row_id = (piece index << ROW_BITS) | output row in the piece: unique, and small enough for the
  tokenizer's `<< PIECE_BITS` chunk ids to stay within int64.
- Each task writes its tokenized rows as Parquet straight into the entry's temporary directory
  (`<split>/part-<piece>-<k>.parquet`, a file per batch read) and returns its counts; the driver
  only sums them, so its memory does not grow with the data. Training rows of a piece are
  written in a seeded hash order, and pieces of different sources alternate.

The driver path (`data.load_tables`) carves with an in-memory permutation instead: the same
recipe gets other (equally deterministic) splits below the threshold.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from launcher.data import (
    SPLITS,
    Fields,
    TokenizationLedger,
    canonical_columns,
    data_error_in,
    fields_for,
    read_file,
    source_name,
    sources_of,
    tokenize_and_record,
    with_source,
)
from launcher.hf_files import HubSplit, named_tables, reader_placement, resolve_split
from launcher.progress import progress_display
from launcher.records import DataError, short_reason
from launcher.source_files import SourceFile, is_remote, list_files
from launcher.tokenize import (
    PIECE_BITS,
    TOKENIZE_BATCH_ROWS,
    check_prompt_template,
    no_examples_left,
    tokenizer_for_batches,
)

STREAM_BYTES = 16 * 2**20
"""Sources larger than this (bytes on disk, all splits together) are prepared by Ray Data tasks."""
STREAM_BYTES_ENV = "FTLAUNCH_STREAM_BYTES"
PIECE_BYTES = 4 * 2**20
"""Target size of a JSON Lines byte range read by one task."""
ROW_BITS = 27
"""Output rows per piece: row_id = (piece << ROW_BITS) | row, below 2**(63 - PIECE_BITS)."""
MAX_PIECES = 2 ** (63 - PIECE_BITS - ROW_BITS)
PARQUET_BATCH_ROWS = 16_384
_ERROR = "data_error"


def stream_bytes() -> int:
    """The size above which preparation streams (FTLAUNCH_STREAM_BYTES overrides it)."""
    return int(os.environ.get(STREAM_BYTES_ENV) or STREAM_BYTES)


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Piece:
    """What one task reads: a byte range of a JSON Lines file, or a whole file."""

    index: int
    split: str
    """The split the rows belong to; "train" rows may be carved into validation / test."""
    source: str
    """The source's name (part of every row's key)."""
    source_id: int | None
    """Index in StreamPlan.sources when the split is a list of sources, else None."""
    path: str
    """A local path or a URI."""
    rel: str
    """The file's path relative to its source (part of every row's key)."""
    kind: str
    """lines | parquet | arrow (an hf: cache file) | whole"""
    start: int = 0
    end: int = 0


@dataclass
class StreamPlan:
    """Every piece of every split, and what the tasks need to split, mix and balance."""

    pieces: list[Piece]
    total_bytes: int
    fractions: dict[str, float]
    """validation / test fractions carved from train (splits not given)."""
    sources: list[str]
    """Source names in source_id order (empty unless a split is a list of sources)."""
    weights: dict[int, float] = field(default_factory=dict)
    """Training source_id -> mixing weight (when train is a list of several sources)."""


def source_paths(spec: Any) -> list[str]:
    """The paths of a split's spec (one source or a list of them)."""
    listed = sources_of(spec)
    return [spec] if listed is None else [s.path for s in listed]


def hub_splits(recipe: Any) -> dict[str, HubSplit]:
    """Every `hf:` split of the recipe, loaded once for the plan, the fingerprint and the
    driver path's read (loading one again may ask the hub again). One that cannot be loaded is
    bad input now (the message the driver path would give later)."""
    specs = [getattr(recipe.data, split) for split in SPLITS]
    paths = [p for spec in specs if spec is not None for p in source_paths(spec)]
    return {p: resolve_split(p) for p in dict.fromkeys(paths) if p.startswith("hf:")}


def stream_plan(
    recipe: Any, base_dir: Path | None = None, hub: dict[str, HubSplit] | None = None
) -> StreamPlan | None:
    """The pieces to prepare in Ray Data tasks, or None when the driver path should read the
    data (sources no larger than stream_bytes(), or an `hf:` split that is not whole cache
    files; `hub`: hf: splits already resolved). Lists files; reads none."""
    d = recipe.data
    given = {name: getattr(d, name) for name in SPLITS if getattr(d, name) is not None}
    specs = {name: sources_of(spec) for name, spec in given.items()}
    paths = [s.path for listed in specs.values() for s in listed or ()]
    paths += [spec for name, spec in given.items() if specs[name] is None]
    fractions = {
        name: getattr(d.split, name)
        for name in ("validation", "test")
        if name not in given and getattr(d.split, name) > 0
    }
    multi = [name for name in SPLITS if name in given and specs[name] is not None]
    sources = list(dict.fromkeys(s.name for name in multi for s in specs[name]))
    files: list[tuple[str, str, int | None, SourceFile]] = []
    weights: dict[int, float] = {}
    for name, spec in given.items():
        listed = specs[name]
        for s in listed or [None]:
            sid = None if s is None else sources.index(s.name)
            found = list_files(spec if s is None else s.path, base_dir, hub)
            if found is None:
                return None
            files += [(name, source_name(spec) if s is None else s.name, sid, f) for f in found]
            if s is not None and name == "train" and len(listed) > 1:
                weights[sid] = s.weight
    total = sum(f.size for *_, f in files)
    remote = any(is_remote(p) for p in paths)  # the driver path reads local files only
    if not remote and total <= stream_bytes():
        return None
    pieces = _interleaved(_cut(name, src, sid, f) for name, src, sid, f in files)
    if len(pieces) > MAX_PIECES:
        raise DataError(f"data: {len(pieces)} pieces to read; at most {MAX_PIECES} fit row ids")
    pieces = [replace(p, index=i) for i, p in enumerate(pieces)]
    return StreamPlan(pieces, total, fractions, sources, weights)


def _cut(split: str, source: str, sid: int | None, f: SourceFile) -> list[Piece]:
    suffix = Path(f.path).suffix.lower()
    if suffix == ".jsonl" and f.size > 0:
        count = max(1, math.ceil(f.size / PIECE_BYTES))
        bounds = [round(i * f.size / count) for i in range(count + 1)]
        return [
            Piece(0, split, source, sid, f.path, f.rel, "lines", a, b)
            for a, b in itertools.pairwise(bounds)
        ]
    kind = {".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "whole")
    return [Piece(0, split, source, sid, f.path, f.rel, kind, 0, f.size)]


def _interleaved(groups: Iterator[list[Piece]]) -> list[Piece]:
    """Pieces of each source in file order, sources taking turns (so mixed rows interleave)."""
    by_source: dict[tuple[str, str], list[Piece]] = {}
    for group in groups:
        for p in group:
            by_source.setdefault((p.split, p.source), []).append(p)
    queues = list(by_source.values())
    rounds = range(max((len(q) for q in queues), default=0))
    return [q[i] for i in rounds for q in queues if i < len(q)]


# ------------------------------------------------------------------------ row keys and hashes


def _key_base(seed: int, salt: str, piece: Piece) -> np.uint64:
    text = f"{seed}\0{salt}\0{piece.source}\0{piece.rel}".encode()
    return np.uint64(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little"))


def uniform(seed: int, salt: str, piece: Piece, locators: np.ndarray) -> np.ndarray:
    """A stable uniform number in [0, 1) per row key (splitmix64 of the key's hash)."""
    with np.errstate(over="ignore"):
        x = locators.astype(np.uint64) ^ _key_base(seed, salt, piece)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ------------------------------------------------------------------------------ reading


def _open(path: str) -> Any:
    import pyarrow.fs as pafs

    if is_remote(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.open_input_file(inner)
    return pafs.LocalFileSystem().open_input_file(path.removeprefix("file://"))


def piece_tables(piece: Piece, fields: Fields) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The piece's rows as validated canonical tables, with each row's locator. A file that
    cannot be read (corrupt, gone since it was listed) is bad data too: exit 2, named."""
    try:
        if piece.kind == "lines":
            yield _lines_table(piece, fields)
        elif piece.kind in ("parquet", "arrow"):
            yield from _batched_tables(piece, fields)
        else:
            table = _whole_table(piece, fields)
            yield table, np.arange(table.num_rows, dtype=np.int64)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{piece.path}: cannot read file: {short_reason(exc)}") from None


def _newline_at_or_after(f: Any, pos: int, size: int, chunk: int = 1 << 16) -> int:
    while pos < size:
        data = f.read_at(min(chunk, size - pos), pos)
        found = data.find(b"\n")
        if found >= 0:
            return pos + found
        pos += len(data)
    return size


def _lines_table(piece: Piece, fields: Fields) -> tuple[pa.Table, np.ndarray]:
    """The JSON Lines rows whose first byte lies in [start, end)."""
    import pyarrow.json as pj

    with _open(piece.path) as f:
        size = f.size()
        lo = 0 if piece.start == 0 else _newline_at_or_after(f, piece.start - 1, size) + 1
        hi = size if piece.end >= size else _newline_at_or_after(f, piece.end - 1, size) + 1
        buf = f.read_at(hi - lo, lo) if hi > lo else b""
    offsets, lines = [], []
    position = lo
    for line in buf.split(b"\n"):
        if line.strip():
            offsets.append(position)
            lines.append(line)
        position += len(line) + 1
    locators = np.asarray(offsets, dtype=np.int64)
    if not lines:
        return pa.table({}), locators

    def where(i: int) -> str:
        return f"{piece.path}: line {_line_number(piece.path, offsets[i])}"

    body = b"\n".join(lines) + b"\n"
    try:
        options = pj.ReadOptions(block_size=max(1 << 20, len(body) + 1))
        table = pj.read_json(pa.BufferReader(body), read_options=options)
    except pa.ArrowInvalid:
        table = _rows_one_by_one(lines, where)
    return canonical_columns(table, fields, where), locators


def _rows_one_by_one(lines: list[bytes], where: Any) -> pa.Table:
    """Parse lines in Python to name the bad one (pyarrow does not say which)."""
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where(i)}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where(i)}: expected a JSON object per line")
        rows.append(row)
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise DataError(f"{where(0)}: rows do not share one type per field ({exc})") from None


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the byte offset; counted only when a row is reported."""
    count, pos = 0, 0
    with _open(path) as f:
        while pos < offset:
            data = f.read_at(min(1 << 20, offset - pos), pos)
            count += data.count(b"\n")
            pos += len(data)
    return count + 1


def _batched_tables(piece: Piece, fields: Fields) -> Iterator[tuple[pa.Table, np.ndarray]]:
    start = 0
    for table in _tables_of(piece):
        base = start

        def where(i: int, base: int = base) -> str:
            return f"{piece.path}: row {base + i + 1}"

        yield (
            canonical_columns(table, fields, where),
            np.arange(start, start + table.num_rows, dtype=np.int64),
        )
        start += table.num_rows
    if start == 0 and piece.kind != "arrow":  # a split may have an empty cache shard
        raise DataError(f"{piece.path}: file is empty (no rows)")


def _tables_of(piece: Piece) -> Iterator[pa.Table]:
    if piece.kind == "arrow":
        yield from named_tables(piece.path, PARQUET_BATCH_ROWS)
        return
    import pyarrow.parquet as pq

    with _open(piece.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield pa.Table.from_batches([batch])


def _whole_table(piece: Piece, fields: Fields) -> pa.Table:
    if not is_remote(piece.path):
        return read_file(Path(piece.path.removeprefix("file://")), fields).table
    # Remote CSV / JSON / text: a local copy, read by the same reader as local files.
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(piece.rel).name
        with _open(piece.path) as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        try:
            return read_file(local, fields).table
        except DataError as exc:
            raise DataError(str(exc).replace(str(local), piece.path)) from None


# ------------------------------------------------------------------------------ the tasks


@dataclass
class TaskSettings:
    """What every task needs besides its piece (pickled once into the tasks)."""

    fields: Fields
    batch_fn: Any
    split_seed: int
    seed: int
    fractions: dict[str, float]
    labels: int
    """Number of classification labels (0: not classification)."""
    repeat: dict[int, float] = field(default_factory=dict)
    """Training source_id (or -1) -> mixing factor; empty: no mixing."""
    keep: dict[int, float] = field(default_factory=dict)
    """Label id -> probability of keeping a training copy; empty: no balancing."""
    out_dir: str = ""


def _assign(piece: Piece, locators: np.ndarray, s: TaskSettings) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of every row of a piece."""
    out = np.full(len(locators), SPLITS.index(piece.split), dtype=np.int8)
    if piece.split != "train" or not s.fractions:
        return out
    u = uniform(s.split_seed, "split", piece, locators)
    test = s.fractions.get("test", 0.0)
    out[u < test + s.fractions.get("validation", 0.0)] = 1
    out[u < test] = 2
    return out


def _copies(piece: Piece, locators: np.ndarray, labels: np.ndarray | None, s: TaskSettings):
    """How many times each training row is written (mixing repeats, balancing drops)."""
    factor = s.repeat.get(piece.source_id if piece.source_id is not None else -1, 1.0)
    whole = math.floor(factor)
    extra = uniform(s.seed, "mix", piece, locators) < factor - whole
    counts = np.full(len(locators), whole, dtype=np.int64) + extra
    if s.keep and labels is not None:
        p = np.asarray([s.keep[k] for k in range(s.labels)])[labels]
        kept = np.zeros_like(counts)
        for c in range(int(counts.max(initial=0))):
            u = uniform(s.seed, f"balance{c}", piece, locators)
            kept += (c < counts) & (u < p)
        counts = kept
    return counts


def _with_source(table: pa.Table, piece: Piece, names: list) -> pa.Table:
    return table if piece.source_id is None else with_source(table, piece.source, names)


def count_piece(piece: Piece, s: TaskSettings) -> dict:
    """Validate a piece and count its training rows per source and label (for mixing and
    balancing)."""
    counts: Counter = Counter()
    for table, locators in piece_tables(piece, s.fields):
        train = _assign(piece, locators, s) == 0
        sid = piece.source_id if piece.source_id is not None else -1
        if "label" not in table.column_names:
            counts[f"{sid}:-1"] += int(train.sum())
            continue
        labels = table.column("label").to_numpy()[train]
        for label, n in zip(*np.unique(labels, return_counts=True), strict=True):
            counts[f"{sid}:{label}"] += int(n)
    return dict(counts)


def write_piece(piece: Piece, s: TaskSettings, names: list[str]) -> dict:
    """Validate, split, mix/balance, tokenize and write a piece; returns per-split counts."""
    import pyarrow.parquet as pq

    ledger = TokenizationLedger()
    next_row = 0
    part = 0
    for table, locators in piece_tables(piece, s.fields):
        if not table.num_rows:
            continue
        table = _with_source(table, piece, names)
        assigned = _assign(piece, locators, s)
        for k, split in enumerate(SPLITS):
            chosen = np.flatnonzero(assigned == k)
            if not len(chosen):
                continue
            if split == "train" and (s.repeat or s.keep):
                labels = table.column("label").to_numpy()[chosen] if s.keep else None
                chosen = np.repeat(chosen, _copies(piece, locators[chosen], labels, s))
            if split == "train":
                copy = np.arange(len(chosen)) - np.searchsorted(chosen, chosen)
                salt_keys = locators[chosen] * 64 + copy
                chosen = chosen[np.argsort(uniform(s.seed, "order", piece, salt_keys))]
            rows = table.take(pa.array(chosen))
            ids = (piece.index << ROW_BITS) + next_row + np.arange(rows.num_rows, dtype=np.int64)
            next_row += rows.num_rows
            if next_row >= 1 << ROW_BITS:
                raise DataError(f"{piece.path}: more than {1 << ROW_BITS} rows in one file")
            rows = rows.append_column("row_id", pa.array(ids))
            tokenized = [
                tokenize_and_record(rows.slice(i, TOKENIZE_BATCH_ROWS), s.batch_fn, ledger, split)
                for i in range(0, rows.num_rows, TOKENIZE_BATCH_ROWS)
            ]
            # Counted by the ledger; a file per read batch and split (a hit reads tens of
            # files, not thousands).
            outputs = [t.replace_schema_metadata(None) for t in tokenized if t.num_rows]
            if outputs:
                out_file = Path(s.out_dir) / split / f"part-{piece.index:06d}-{part:05d}.parquet"
                pq.write_table(pa.concat_tables(outputs), out_file)
                part += 1
    return ledger.snapshot()


def reading_settings(plan: StreamPlan, recipe: Any) -> TaskSettings:
    """Settings that read and split rows as the tasks do, without tokenizing."""
    return TaskSettings(
        fields=fields_for(recipe),
        batch_fn=None,
        split_seed=recipe.data.split.seed,
        seed=recipe.train.seed,
        fractions=plan.fractions,
        labels=0,
    )


def split_rows(plan: StreamPlan, recipe: Any, split: str) -> pa.Table | None:
    """The raw rows of one split (the batch stage's evaluation split), read piece by piece here
    with the tasks' split rule; None when the plan has none. Holds that split's rows only."""
    settings = reading_settings(plan, recipe)
    k = SPLITS.index(split)
    carved = split in plan.fractions
    parts = []
    for piece in (p for p in plan.pieces if p.split == split or (carved and p.split == "train")):
        offset = 0  # rows of the piece before this table (a Parquet file comes in batches)
        for table, locators in piece_tables(piece, settings.fields):
            chosen = np.flatnonzero(_assign(piece, locators, settings) == k)
            rows = _with_source(table.take(pa.array(chosen)), piece, plan.sources)
            ids = (piece.index << ROW_BITS) + offset + chosen.astype(np.int64)
            offset += table.num_rows
            if len(chosen):
                parts.append(rows.append_column("row_id", pa.array(ids)))
    return pa.concat_tables(parts) if parts else None


def _run_tasks(plan: StreamPlan, fn: Any, description: str, **kwargs: Any) -> Iterator[dict]:
    """fn(piece, **kwargs) for every piece in Ray Data tasks; yields the results as they come,
    with a progress bar of the pieces done (a large source takes minutes)."""
    import ray

    pieces = [{"piece": json.dumps(asdict(p))} for p in plan.pieces]

    def run(batch: dict) -> dict:
        results = []
        for p in batch["piece"]:
            try:
                results.append(fn(Piece(**json.loads(p)), **kwargs))
            except DataError as exc:  # as data: Ray Data's wrappers would drop its type
                results.append({_ERROR: str(exc)})
        return {"result": [json.dumps(r) for r in results]}

    ds = ray.data.from_items(pieces, override_num_blocks=min(len(pieces), 200))
    cpus, placement = int(ray.cluster_resources().get("CPU", 1)), {}
    if any(p.kind == "arrow" for p in plan.pieces):
        cpus, placement = reader_placement()  # where `datasets` keeps the files
    # Ray Data's default budget runs these (tiny input, long-running) tasks one at a time.
    pool = ray.data.TaskPoolStrategy(size=max(1, min(len(pieces), cpus)))
    ds = ds.map_batches(run, batch_size=1, batch_format="numpy", compute=pool, **placement)
    with progress_display(len(pieces), description, unit="pieces") as advance:
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            if _ERROR in result:
                raise DataError(result[_ERROR])
            advance(1)
            yield result


# ------------------------------------------------------------------------------ the driver


def write_splits(
    plan: StreamPlan, recipe: Any, tokenizer: Any, out_dir: Path
) -> dict[str, dict[str, int]]:
    """Prepare every split of the plan into `out_dir/<split>/` with Ray Data tasks; returns the
    tasks' counts summed per split (calls, rows_in, rows_out, tokens_out, dropped_<reason>).

    Raises DataError for bad data (wherever the task found it) and for empty splits; the caller
    removes `out_dir` then. Needs a running Ray.
    """
    d = recipe.data
    check_prompt_template(d.prompt_template)
    labels = len(recipe.model.labels or ()) if d.format == "classification" else 0
    settings = TaskSettings(
        fields=fields_for(recipe, tokenizer),
        batch_fn=tokenizer_for_batches(recipe, tokenizer),
        split_seed=d.split.seed,
        seed=recipe.train.seed,
        fractions=plan.fractions,
        labels=labels,
        out_dir=str(out_dir),
    )
    splits = {p.split for p in plan.pieces} | set(plan.fractions) | {"train"}
    for split in splits:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    try:
        if plan.weights or (d.balance and labels):
            _plan_copies(plan, settings, recipe, balance=bool(d.balance and labels))
        totals: dict[str, dict[str, int]] = {}
        tasks = _run_tasks(plan, write_piece, "prepare", s=settings, names=plan.sources)
        for result in tasks:
            for split, counts in result.items():
                entry = totals.setdefault(split, {})
                for key, value in counts.items():
                    entry[key] = entry.get(key, 0) + value
    except BaseException as exc:
        data_error = data_error_in(exc)
        if data_error is not None:
            raise data_error from None
        raise
    for split in sorted(splits, key=SPLITS.index):
        counts = totals.get(split, {})
        if not counts.get("rows_in"):
            raise DataError(f"data.{split}: the {split} split is empty (no rows)")
        if not counts.get("rows_out"):
            raise no_examples_left(split, counts["rows_in"], d.format, d.max_length)
    return {k: totals[k] for k in sorted(totals, key=SPLITS.index)}


def _plan_copies(plan: StreamPlan, s: TaskSettings, recipe: Any, *, balance: bool) -> None:
    """Count training rows per source and label (a validating pass in tasks over the pieces
    that hold training rows), then set the mixing factors and balancing probabilities."""
    counts: Counter = Counter()
    training = replace(plan, pieces=[p for p in plan.pieces if p.split == "train"])
    for result in _run_tasks(training, count_piece, "count", s=s):
        for key, n in result.items():
            sid, label = (int(x) for x in key.split(":"))
            counts[(sid, label)] += n
    per_source: Counter = Counter()
    for (sid, _), n in counts.items():
        per_source[sid] += n
    if plan.weights:
        total = sum(per_source.values())
        weight_sum = sum(plan.weights.values())
        for sid, weight in plan.weights.items():
            rows = per_source.get(sid, 0)
            if rows == 0:
                raise DataError(f"data.train: source {plan.sources[sid]} has no training rows")
            s.repeat[sid] = weight / weight_sum * total / rows
    if balance:
        names = list(recipe.model.labels or ())
        expected = [0.0] * s.labels
        for (sid, label), n in sorted(counts.items()):
            if 0 <= label < s.labels:
                expected[label] += n * s.repeat.get(sid, 1.0)
        empty = [names[k] for k, n in enumerate(expected) if n == 0]
        if empty:
            raise DataError(
                f"data.balance: label(s) {', '.join(empty)} have no training rows, so "
                "balancing would leave nothing"
            )
        smallest = min(expected)
        s.keep.update({k: smallest / n for k, n in enumerate(expected)})
