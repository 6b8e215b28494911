"""Stage 1 of the driver: data sources → validated Arrow tables → tokenized Ray Datasets.

The flow, in the driver, before any training worker exists:

1. read   every source of every split into an Arrow table with canonical columns
          (`text` / `instruction`, `input`, `output` / `messages` / `text`, `label`),
          validating each row; bad data raises `DataError` naming file, row (line for JSON
          Lines) and field. Chat rows are checked against the chat template too (every row
          must render) and kept as JSON text of their normalized messages.
2. split  carve missing validation / test splits from train (deterministic, `data.split.seed`).
3. mix    several training sources are sampled in proportion to their weights (`source` column).
4. balance  classification: undersample train to equal class counts.
5. tokenize once, in Ray Data `map_batches`, then `materialize()`: training workers only read
          their shard of the finished blocks, never tokenize, and never wait on data tasks that
          would need CPUs the trainer holds (see DESIGN.md on the 2-core hang).

Sources: local .jsonl/.json/.csv/.tsv/.parquet/.txt files, directories of them (searched
recursively, in sorted order), glob patterns (`shards/*.parquet`, `**` spans directories), and `hf:<dataset>[:<config>]:<split>` through `datasets`.
A .txt file holds documents separated by blank lines (a file without blank lines is one
document); long documents are chunked to `max_length` during tokenization.

Validation and test splits given as a list of sources are concatenated (weights only shape the
training mix: evaluation sees every row once), with the same `source` column.

Validation and splitting work on whole Arrow tables in the driver with pyarrow compute: a full
scan is needed anyway to reject bad rows before training starts, and the tables are columnar, so
this costs memory proportional to the raw text only.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from launcher.chat import ChatDataError, ChatEncoder
from launcher.raysession import in_process_allowed
from launcher.records import (
    DataError,
    RawTable,
    SourceNotFound,
    glob_files,
    is_glob,
    local_path,
    not_found,
    read_directory,
    read_files,
    read_hf,
    read_table,
    source_name,
)
from launcher.tokenize import (
    TOKENIZE_BATCH_ROWS,
    chat_encoder,
    check_prompt_template,
    dropped_rows,
    no_examples_left,
    tokenizer_for_batches,
)

SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Fields:
    """Which raw fields the data format needs, and the canonical column each becomes."""

    required: dict[str, str]
    """canonical column -> raw field name; the field must be present and non-null."""
    optional: dict[str, str] = field(default_factory=dict)
    """canonical column -> raw field name; may be missing (becomes "")."""
    labels: tuple[str, ...] | None = None
    """classification: allowed label names, in id order."""
    setting: dict[str, str] = field(default_factory=dict)
    """canonical column -> the recipe key that names the raw field (for messages)."""
    chat: ChatEncoder | None = None
    """chat: checks each row's messages (and that the template renders them); without one
    (no tokenizer at hand) only the message layout is checked."""


def fields_for(recipe: Any, tokenizer: Any = None) -> Fields:
    """The fields `recipe.data.format` reads from each row; chat rows are checked against the
    chat template when the tokenizer is given."""
    d = recipe.data
    if d.format == "chat":
        return Fields(
            {"messages": d.messages_field},
            setting={"messages": "data.messages_field"},
            chat=chat_encoder(recipe, tokenizer) if tokenizer is not None else None,
        )
    if d.format == "text":
        return Fields({"text": d.text_field}, setting={"text": "data.text_field"})
    if d.format == "classification":
        return Fields(
            {"text": d.text_field, "label": d.label_field},
            labels=tuple(recipe.model.labels or ()),
            setting={"text": "data.text_field", "label": "data.label_field"},
        )
    f = d.instruction_fields
    return Fields(
        {"instruction": f.instruction, "output": f.output},
        optional={"input": f.input},
        setting={
            "instruction": "data.instruction_fields.instruction",
            "output": "data.instruction_fields.output",
            "input": "data.instruction_fields.input",
        },
    )


def read_source(
    spec: str, fields: Fields, base_dir: Path | None = None, loaded: Mapping[str, Any] | None = None
) -> RawTable:
    """Read one source (file, directory or hf: spec) into validated canonical columns.
    `loaded`: hf: specs already loaded, to their `datasets.Dataset`."""
    if spec.startswith("hf:"):
        return _canonical(read_hf(spec, (loaded or {}).get(spec)), fields)
    path = local_path(spec, base_dir)
    if is_glob(spec):
        return read_files(glob_files(path), functools.partial(read_file, fields=fields))
    if not path.exists():
        raise not_found(spec, path, base_dir)
    if path.is_dir():
        return read_directory(path, functools.partial(read_file, fields=fields))
    return read_file(path, fields)


def read_file(path: Path, fields: Fields) -> RawTable:
    """Read one local file by its suffix and validate its rows."""
    if path.suffix.lower() == ".txt" and (
        "text" not in fields.required or len(fields.required) != 1
    ):
        raise DataError(
            f"{path}: .txt files hold plain text only; data.format "
            f"{_format_of(fields)} needs "
            f"fields {', '.join(fields.required.values())}: use .jsonl, .csv or .parquet"
        )
    return _canonical(read_table(path, text_column=fields.required.get("text", "text")), fields)


def _format_of(fields: Fields) -> str:
    for column, fmt in (("label", "classification"), ("messages", "chat")):
        if column in fields.required:
            return fmt
    return "instruction"


def _canonical(raw: RawTable, fields: Fields) -> RawTable:
    return RawTable(canonical_columns(raw.table, fields, raw.where), raw.where)


# ---------------------------------------------------------------------------- validation


def canonical_columns(table: pa.Table, fields: Fields, where: Callable[[int], str]) -> pa.Table:
    """Check every row has the fields the format needs; return only canonical columns.

    classification labels become int64 ids in `fields.labels` order.
    """
    out: dict[str, pa.Array] = {}
    present = ", ".join(table.column_names) or "(none)"
    for column, name in fields.required.items():
        setting = fields.setting.get(column, "")
        if name not in table.column_names:
            raise DataError(
                f"{where(0)}: missing field {name!r} ({setting}); fields present: {present}"
            )
        values = table.column(name).combine_chunks()
        missing = _first_true(pc.is_null(values))
        if missing is not None:
            raise DataError(f"{where(missing)}: missing field {name!r} ({setting})")
        if column == "label":
            out["label"] = _label_ids(values, name, fields.labels or (), where)
        elif column == "messages":
            out["messages"] = _checked_messages(values, name, setting, fields.chat, where)
        else:
            out[column] = _as_text(values, name, setting, where)
    for column, name in fields.optional.items():
        if name in table.column_names:
            values = table.column(name).combine_chunks()
            if pa.types.is_null(values.type):
                values = pa.nulls(len(values), pa.string())
            values = _as_text(pc.fill_null(values, ""), name, fields.setting.get(column, ""), where)
        else:
            values = pa.array([""] * table.num_rows, pa.string())
        out[column] = values
    return pa.table(out)


def _checked_messages(
    values: pa.Array,
    name: str,
    setting: str,
    encoder: ChatEncoder | None,
    where: Callable[[int], str],
) -> pa.Array:
    """Every row's messages checked and normalized, as JSON text (one column type whatever the
    layout, so sources with different message keys mix)."""
    from launcher.chat import normalize_messages

    out = []
    for i, value in enumerate(values.to_pylist()):
        try:
            if encoder is not None:
                messages = encoder.check_row(value, i)
            else:
                messages = normalize_messages(value, row=i, field_name=name)
        except ChatDataError as exc:
            raise DataError(f"{where(i)}: field {name!r} ({setting}): {exc.detail}") from None
        out.append(json.dumps(messages, ensure_ascii=False))
    return pa.array(out, pa.string())


def _first_true(mask: pa.Array) -> int | None:
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def _as_text(values: pa.Array, name: str, setting: str, where: Callable[[int], str]) -> pa.Array:
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    raise DataError(
        f"{where(0)}: field {name!r} ({setting}) must be text, got {values.type} values"
    )


def _label_ids(
    values: pa.Array, name: str, labels: Sequence[str], where: Callable[[int], str]
) -> pa.Array:
    if not (
        pa.types.is_string(values.type)
        or pa.types.is_large_string(values.type)
        or pa.types.is_integer(values.type)
        or pa.types.is_boolean(values.type)
    ):
        raise DataError(
            f"{where(0)}: field {name!r} (data.label_field) must be a label name, "
            f"got {values.type} values"
        )
    names = values.cast(pa.string())
    ids = pc.index_in(names, value_set=pa.array(list(labels), pa.string()))
    unknown = _first_true(pc.is_null(ids))
    if unknown is not None:
        hint = (
            " (numeric labels are matched by name: list them as strings in model.labels)"
            if pa.types.is_integer(values.type)
            else ""
        )
        raise DataError(
            f"{where(unknown)}: field {name!r} has label {names[unknown].as_py()!r}, "
            f"which is not in model.labels [{', '.join(labels)}]{hint}"
        )
    return ids.cast(pa.int64())


# -------------------------------------------------------------- splitting, mixing, balancing


def carve(table: pa.Table, fractions: dict[str, float], seed: int) -> dict[str, pa.Table]:
    """Deterministically carve `fractions` (split name -> fraction) out of `table`.

    Returns the carved splits plus "train" (the rest). A positive fraction always carves at least
    one row; the rest must keep at least one row.
    """
    n = table.num_rows
    order = np.random.default_rng(seed).permutation(n)
    out: dict[str, pa.Table] = {}
    start = 0
    for name in ("test", "validation"):
        fraction = fractions.get(name, 0.0)
        if fraction <= 0:
            continue
        count = max(1, round(fraction * n))
        out[name] = table.take(np.sort(order[start : start + count]))
        start += count
    if start >= n:
        raise DataError(
            f"training data has {n} rows: too few to carve "
            + " and ".join(f"{k} {v:g}" for k, v in fractions.items() if v > 0)
            + " and keep rows for training (give more data, or validation/test files)"
        )
    out["train"] = table.take(np.sort(order[start:]))
    return out


def mix(tables: Sequence[pa.Table], weights: Sequence[float], seed: int) -> pa.Table:
    """Sample sources in proportion to their weights.

    The mix has as many rows as the sources together; source i contributes
    round(weight_i / sum(weights) * total) rows: a random subset of its rows when it has more,
    and every row repeated (plus a random remainder) when it has fewer.
    """
    rng = np.random.default_rng(seed)
    total = sum(t.num_rows for t in tables)
    shares = np.asarray(weights, dtype=float) / float(sum(weights))
    counts = _largest_remainder(shares * total)
    picked = []
    for table, count in zip(tables, counts, strict=True):
        n = table.num_rows
        whole, rest = divmod(int(count), n)
        index = np.concatenate(
            [np.tile(np.arange(n), whole), np.sort(rng.choice(n, rest, replace=False))]
        ).astype(np.int64)
        picked.append(table.take(index))
    return pa.concat_tables(picked)


def _largest_remainder(values: np.ndarray) -> np.ndarray:
    """Round values to integers that keep their sum."""
    floors = np.floor(values).astype(np.int64)
    missing = round(float(values.sum())) - int(floors.sum())
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:missing]] += 1
    return floors


def balance(table: pa.Table, labels: Sequence[str], seed: int) -> pa.Table:
    """Undersample every class to the size of the smallest one (classification train split)."""
    ids = table.column("label").to_numpy()
    counts = np.bincount(ids, minlength=len(labels))
    empty = [labels[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise DataError(
            f"data.balance: label(s) {', '.join(empty)} have no training rows, so balancing "
            f"would leave nothing (counts: "
            + ", ".join(f"{label}={c}" for label, c in zip(labels, counts, strict=True))
            + ")"
        )
    rng = np.random.default_rng(seed)
    keep = int(counts.min())
    chosen = [rng.choice(np.flatnonzero(ids == k), keep, replace=False) for k in range(len(labels))]
    return table.take(np.sort(np.concatenate(chosen)))


def shuffle(table: pa.Table, seed: int) -> pa.Table:
    """The rows in a seeded random order (so mixed sources interleave)."""
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


# ------------------------------------------------------------------------- load all splits


@dataclass
class Source:
    """One entry of a split's data spec."""

    path: str
    weight: float
    name: str | None


def sources_of(spec: Any) -> list[Source] | None:
    """A split's spec as a list of sources; None for a single source (no `source` column)."""
    if spec is None or isinstance(spec, str):
        return None
    out = [Source(s.path, s.weight, s.name or source_name(s.path)) for s in spec]
    names = [s.name for s in out]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(
            f"data sources share the name(s) {', '.join(duplicated)}: give each source a "
            "distinct `name`"
        )
    return out


def _read_split(
    name: str, spec: Any, fields: Fields, base_dir: Path | None, loaded: Mapping[str, Any] | None
) -> list[tuple[Source, pa.Table]]:
    listed = sources_of(spec) or [Source(spec, 1.0, None)]
    try:
        return [(s, read_source(s.path, fields, base_dir, loaded).table) for s in listed]
    except SourceNotFound as exc:
        raise SourceNotFound(f"data.{name}: {exc}") from None


def load_tables(
    recipe: Any,
    base_dir: Path | None = None,
    tokenizer: Any = None,
    loaded: Mapping[str, Any] | None = None,
) -> dict[str, pa.Table]:
    """Read, validate, split, mix and balance: the raw (untokenized) table of every split.

    Runs in the driver and needs no Ray. Columns: the canonical ones of the format, `row_id`
    (0..n-1 in final order) and `source` / `source_id` when a split is a list of sources.
    With the tokenizer, chat rows are also checked against the chat template (a missing or
    broken template and rows it rejects fail here). `loaded`: hf: splits already loaded (spec
    to `datasets.Dataset`), read from there instead of being loaded again.
    """
    d = recipe.data
    fields = fields_for(recipe, tokenizer)
    given = {name: getattr(d, name) for name in SPLITS if getattr(d, name) is not None}
    fractions = {
        name: getattr(d.split, name) for name in ("validation", "test") if name not in given
    }
    read = {name: _read_split(name, spec, fields, base_dir, loaded) for name, spec in given.items()}
    multi = {name: sources_of(spec) is not None for name, spec in given.items()}

    # Carve per training source, so a row carved out never reaches train even when mixing
    # repeats a small source.
    parts: dict[str, list[tuple[Source, pa.Table]]] = {name: [] for name in SPLITS}
    for name in given:
        if name != "train":
            parts[name] = read[name]
    for source, table in read["train"]:
        carved = carve(table, fractions, d.split.seed) if fractions else {"train": table}
        for name, piece in carved.items():
            parts[name].append((source, piece))
            multi.setdefault(name, multi["train"])

    seed = recipe.train.seed
    names = list(dict.fromkeys(s.name for name in SPLITS for s, _ in parts[name] if multi[name]))
    tables: dict[str, pa.Table] = {}
    for name in SPLITS:
        if not parts[name]:
            continue
        labelled = [with_source(t, s.name, names) if multi[name] else t for s, t in parts[name]]
        if name == "train" and len(labelled) > 1:
            table = mix(labelled, [s.weight for s, _ in parts[name]], seed)
        else:
            table = pa.concat_tables(labelled)
        if name == "train" and d.balance:
            table = balance(table, recipe.model.labels or (), seed)
        if name == "train":
            table = shuffle(table, seed)
        if table.num_rows == 0:
            raise DataError(f"data.{name}: the {name} split is empty (no rows)")
        tables[name] = table.append_column("row_id", pa.array(np.arange(table.num_rows)))
    return tables


def with_source(table: pa.Table, name: str | None, names: list) -> pa.Table:
    """Tag rows with their source's name and id (the id travels to the training batches)."""
    n = table.num_rows
    table = table.append_column("source", pa.array([name] * n, pa.string()))
    return table.append_column("source_id", pa.array([names.index(name)] * n, pa.int64()))


# ----------------------------------------------------------------------- Ray Data pipeline


# Up to this many rows in all splits, tokenization runs in the driver: one process does about
# 10,000 short rows a second, Ray Data tasks start processes first (8-10 s on 2 cores) and win
# only where many cores share more rows. Larger sources take launcher.stream_data's path.
TOKENIZE_HERE_ROWS = 100_000


class TokenizationLedger:
    """Counts tokenizing calls per split: evidence that tokenization ran once, in the data
    tasks (or the driver), and never again in the training workers (which only read finished
    blocks). An actor when the calls run in Ray Data tasks, a plain object in the driver."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def record(
        self,
        split: str,
        rows_in: int,
        rows_out: int,
        tokens_out: int = 0,
        dropped: dict[str, int] | None = None,
    ) -> None:
        entry = self.counts.setdefault(
            split, {"calls": 0, "rows_in": 0, "rows_out": 0, "tokens_out": 0}
        )
        entry["calls"] += 1
        entry["rows_in"] += rows_in
        entry["rows_out"] += rows_out
        entry["tokens_out"] += tokens_out
        for reason, count in (dropped or {}).items():
            entry[f"dropped_{reason}"] = entry.get(f"dropped_{reason}", 0) + count

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.counts.items()}


def tokenize_and_record(
    batch: pa.Table, fn: Callable[[pa.Table], pa.Table], ledger: Any, split: str
) -> pa.Table:
    out = fn(batch)
    tokens = pc.sum(out.column("num_tokens")).as_py() or 0 if out.num_rows else 0
    counts = (split, batch.num_rows, out.num_rows, tokens, dropped_rows(out))
    if isinstance(ledger, TokenizationLedger):  # tokenizing in the driver
        ledger.record(*counts)
    else:
        import ray

        ray.get(ledger.record.remote(*counts))
    return out


def tokenizes_here(tables: dict[str, pa.Table]) -> bool:
    """Whether the splits are small enough to tokenize in the driver (see TOKENIZE_HERE_ROWS);
    FTLAUNCH_IN_PROCESS=0 keeps them on Ray Data tasks, as it keeps training on a worker."""
    rows = sum(t.num_rows for t in tables.values())
    return in_process_allowed() and rows <= TOKENIZE_HERE_ROWS


def _tokenized_here(table: pa.Table, fn: Callable, ledger: Any, split: str) -> list[pa.Table]:
    """A split tokenized in this process, in the batches map_batches gives the tasks: each
    block of `_blocks` cut into TOKENIZE_BATCH_ROWS rows (packing depends on those bounds), a
    block's batches joined again (one object, one cache file). Empty results are left out, as
    the prepared cache leaves them out, so a later run reading the cache gets the same blocks."""
    out = []
    for block in _blocks(table):
        batches = [
            tokenize_and_record(block.slice(start, TOKENIZE_BATCH_ROWS), fn, ledger, split)
            for start in range(0, block.num_rows, TOKENIZE_BATCH_ROWS)
        ]
        out.append(pa.concat_tables(b.replace_schema_metadata(None) for b in batches))  # counted
    return [t for t in out if t.num_rows] or out[:1]


@dataclass
class PreparedData:
    """Tokenized, materialized splits ready for Ray Train.

    datasets: split name ("train", "validation", "test") -> materialized ray.data.Dataset whose
    rows have input_ids, attention_mask, labels (per-token with -100 for causal LM, an int for
    classification), num_tokens, row_id (unique per example), optional position_ids (packing)
    and source / source_id (splits given as a list of sources).
    """

    datasets: dict[str, Any]
    num_rows: dict[str, int]
    """Examples per split after tokenization (chunks / packed sequences for text)."""
    num_tokens: dict[str, int]
    """Tokens per split (sum of num_tokens, padding excluded)."""
    raw_rows: dict[str, int]
    """Rows per split before tokenization (after splitting, mixing and balancing)."""
    sources: list[str]
    """Source names in source_id order (empty unless a split is a list of sources)."""
    tokenization: dict[str, dict[str, int]] = field(default_factory=dict)
    """The ledger's counts, taken once the splits were materialized (the actor is gone then)."""
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> drop reason -> rows left out on purpose (chat rows too long to train)."""
    cache: dict[str, Any] | None = None
    """The prepared-dataset cache entry these splits came from or went to (launcher.prepared):
    fingerprint, path and whether it was reused."""

    def tokenization_runs(self) -> dict[str, dict[str, int]]:
        """Per split: map_batches calls, rows in and rows out of tokenization.

        rows_in equals raw_rows: every raw row was tokenized once, in the data tasks. The
        splits are materialized, so the training workers only read finished blocks (a task
        that tokenized again would find the ledger actor gone and fail).
        """
        return {k: dict(v) for k, v in self.tokenization.items()}


def prepare_data(
    recipe: Any,
    tokenizer: Any,
    *,
    base_dir: Path | None = None,
    tables: dict[str, pa.Table] | None = None,
) -> PreparedData:
    """Read and validate every split in the driver, then tokenize once with Ray Data.

    Raises DataError (before any training) for bad data. Relative paths are resolved against
    `base_dir` (default: the working directory). `tables` are splits already read with
    `load_tables` (the driver reads them before starting Ray, so bad data fails fast).
    Needs a running Ray (ray.init).
    """
    import ray

    check_prompt_template(recipe.data.prompt_template)
    if tables is None:
        tables = load_tables(recipe, base_dir)
    sources = _source_names(tables)
    batch_fn = tokenizer_for_batches(recipe, tokenizer)
    here = tokenizes_here(tables)
    ledger = TokenizationLedger() if here else ray.remote(num_cpus=0)(TokenizationLedger).remote()
    try:
        datasets, num_rows, num_tokens, dropped = _tokenize_splits(tables, batch_fn, ledger, recipe)
        tokenization = _ledger_counts(ledger)
    except BaseException as exc:
        data_error = data_error_in(exc)
        if data_error is not None:
            raise data_error from None
        raise
    finally:
        if not here:
            ray.kill(ledger)  # no actor outlives the job
    return PreparedData(
        datasets=datasets,
        num_rows=num_rows,
        num_tokens=num_tokens,
        raw_rows={k: t.num_rows for k, t in tables.items()},
        sources=sources,
        tokenization=tokenization,
        dropped=dropped,
    )


def data_error_in(exc: BaseException) -> DataError | None:
    """The DataError a Ray task raised, out of the wrappers Ray puts around it (RayTaskError,
    Ray Data's own), so bad data still exits 2 with its own message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError keeps the task's exception here
        if isinstance(cause, DataError):
            return cause
        if isinstance(current, DataError) and cause is None:
            return current
        if isinstance(cause, BaseException):
            current = cause
        else:
            current = current.__cause__ or current.__context__
    return None


def _tokenize_splits(
    tables: dict[str, pa.Table], batch_fn: Callable, ledger: Any, recipe: Any
) -> tuple[dict[str, Any], dict[str, int], dict[str, int], dict[str, dict[str, int]]]:
    """Tokenize each split in Ray Data map_batches tasks and materialize the result."""
    import ray

    datasets: dict[str, Any] = {}
    num_rows: dict[str, int] = {}
    num_tokens: dict[str, int] = {}
    for split, table in tables.items():
        if isinstance(ledger, TokenizationLedger):
            ds = ray.data.from_blocks(_tokenized_here(table, batch_fn, ledger, split))
        else:
            ds = ray.data.from_arrow(_blocks(table)).map_batches(
                tokenize_and_record,
                batch_format="pyarrow",
                batch_size=TOKENIZE_BATCH_ROWS,
                fn_kwargs={"fn": batch_fn, "ledger": ledger, "split": split},
            )
            # Finished here, before the trainer reserves CPUs: workers read these blocks and
            # never wait on data tasks that could not be scheduled (the 2-core hang in DESIGN.md).
            ds = ds.materialize()
        count = ds.count()
        if count == 0:
            d = recipe.data
            raise no_examples_left(split, table.num_rows, d.format, d.max_length)
        datasets[split] = ds
        num_rows[split] = count
    # Token counts come from the tokenizing tasks themselves: an aggregation over the finished
    # blocks would run another (shuffling) Ray Data job per split.
    counts = _ledger_counts(ledger)
    dropped: dict[str, dict[str, int]] = {}
    for split in datasets:
        num_tokens[split] = int(counts[split]["tokens_out"])
        reasons = {
            k.removeprefix("dropped_"): v
            for k, v in counts[split].items()
            if k.startswith("dropped_")
        }
        if reasons:
            dropped[split] = reasons
    return datasets, num_rows, num_tokens, dropped


def _ledger_counts(ledger: Any) -> dict[str, dict[str, int]]:
    if isinstance(ledger, TokenizationLedger):
        return ledger.snapshot()
    import ray

    return ray.get(ledger.snapshot.remote())


def _source_names(tables: dict[str, pa.Table]) -> list[str]:
    names: dict[str, int] = {}
    for table in tables.values():
        if "source" in table.column_names:
            ids = table.column("source_id").to_pylist()
            for name, i in zip(table.column("source").to_pylist(), ids, strict=True):
                names.setdefault(name, i)
    return sorted(names, key=names.__getitem__)


def _blocks(table: pa.Table, rows_per_block: int = 2 * TOKENIZE_BATCH_ROWS) -> list[pa.Table]:
    """Slices of the table, so tokenization runs as several parallel tasks (at most 16)."""
    count = max(1, min(16, math.ceil(table.num_rows / rows_per_block)))
    size = math.ceil(table.num_rows / count)
    return [table.slice(i * size, size) for i in range(count) if i * size < table.num_rows]
