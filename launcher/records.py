"""The one reader of data files: JSON Lines, JSON, CSV/TSV, Parquet and plain text.

Two ways to read, one set of parsers and messages:

- `read_table` reads a whole file into an Arrow table (the data stage validates columns at
  once); `read_directory` joins the files of a directory, `read_hf` a Hugging Face split.
  Row names in messages read "path: line 7" (JSON Lines, .txt), "path: item 7" (JSON array)
  or "path: row 7" (CSV/TSV, Parquet, hub datasets).
- `iter_rows` streams (place, row) pairs, place being "line 7" / "item 7" / "row 7", so the
  batch stage keeps memory flat however large the input.

What a row is differs in one place only: in a .txt file a whole-table read makes one row per
paragraph (training documents, separated by blank lines), a stream one row per non-blank line
(prompts, texts to score). Unreadable files raise DataError naming the file and, where there is
one, the line.
"""

from __future__ import annotations

import bisect
import csv
import functools
import glob
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from launcher.errors import BadInputError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
# Parquet rows streamed per record batch.
STREAM_BATCH_ROWS = 4096

Namer = Callable[[int], str]
"""Row index (0-based) -> "path: line 7" / "path: row 7"."""


class DataError(BadInputError):
    """Bad data: a missing or unreadable file, a row without a required field, an unknown label,
    an empty dataset. The message names the file, row and field and says what is expected."""


class SourceNotFound(DataError):
    """A local data source that does not exist (the caller adds the setting that names it)."""


def not_found(spec: str, path: Path, base_dir: Path | None) -> SourceNotFound:
    """The error for a missing source; a relative path says what it was taken relative to."""
    relative = not local_path(spec).is_absolute()
    where = f" (a relative path is taken from {base_dir or Path.cwd()})" if relative else ""
    return SourceNotFound(f"{path}: file not found{where}")


@dataclass
class RawTable:
    """Rows read from one source, plus how to name a row in an error message."""

    table: pa.Table
    where: Namer
    """Row index (0-based) -> "path: line 7" / "path: row 7"."""


def check_suffix(path: Path) -> str:
    """The file's (lower-case) suffix, or a DataError listing the types that can be read."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    return suffix


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message (library messages run long)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def row_namer(path: Path | str, noun: str = "row") -> Namer:
    return lambda i: f"{path}: {noun} {i + 1}"


# ------------------------------------------------------------------------------ whole tables


def read_table(path: Path, text_column: str = "text") -> RawTable:
    """Read one local file, by its suffix, into a table of its raw fields.

    A .txt file becomes one `text_column` row per paragraph.
    """
    suffix = check_suffix(path)
    readers: dict[str, Callable[[Path], tuple[pa.Table, Namer]]] = {
        ".jsonl": _jsonl_table,
        ".json": _json_table,
        ".csv": functools.partial(_delimited_table, delimiter=","),
        ".tsv": functools.partial(_delimited_table, delimiter="\t"),
        ".parquet": _parquet_table,
        ".txt": functools.partial(_txt_table, text_column=text_column),
    }
    try:
        table, where = readers[suffix](path)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read file: {short_reason(exc)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty (no rows)")
    return RawTable(table, where)


def data_files(directory: Path) -> list[Path]:
    """The data files under `directory`, recursively, in sorted order; hidden paths skipped."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise DataError(
            f"{directory}: directory has no data files (looked for {', '.join(FILE_SUFFIXES)})"
        )
    return files


def local_path(spec: str, base_dir: Path | None = None) -> Path:
    """The path a local source names: file:// dropped, ~ expanded, a relative path taken
    against `base_dir` (the working directory when None)."""
    path = Path(spec.removeprefix("file://")).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def is_glob(spec: str) -> bool:
    """Whether a source names files by a pattern (`data/*.jsonl`, `shards/**/*.parquet`)."""
    return any(c in spec for c in "*?[")


def glob_files(pattern: Path | str) -> list[Path]:
    """The files a pattern matches (`**` spans directories), in sorted order."""
    files = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{pattern}: no files match this pattern")
    return files


def read_directory(directory: Path, read_one: Callable[[Path], RawTable]) -> RawTable:
    """Every data file of a directory read with `read_one` and joined; rows keep their file's name."""
    return read_files(data_files(directory), read_one)


def read_files(files: list[Path], read_one: Callable[[Path], RawTable]) -> RawTable:
    """Files read with `read_one` and joined in the given order; rows keep their file's name."""
    parts = [read_one(f) for f in files]
    offsets = list(itertools.accumulate((p.table.num_rows for p in parts), initial=0))

    def where(i: int) -> str:
        k = bisect.bisect_right(offsets, i) - 1
        return parts[k].where(i - offsets[k])

    return RawTable(pa.concat_tables([p.table for p in parts]), where)


def _jsonl_table(path: Path) -> tuple[pa.Table, Namer]:
    import pyarrow.json as pj

    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no rows)")
    try:
        table = pj.read_json(path)
    except pa.ArrowInvalid as exc:
        if "Empty JSON file" in str(exc):
            raise DataError(f"{path}: file is empty (no rows)") from None
        # pyarrow does not say which line; find it (and the cause) in plain Python.
        located = list(_jsonl_rows(path))
        places = [place for place, _ in located]
        table = _table_from_rows([row for _, row in located], path, places.__getitem__)
    return table, lambda i: f"{path}: line {_nonblank_line_number(path, i)}"


def _nonblank_line_number(path: Path, row: int) -> int:
    """1-based line number of the row-th (0-based) non-blank line; pyarrow skips blank lines."""
    seen = -1
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return row + 1


def _json_table(path: Path) -> tuple[pa.Table, Namer]:
    if not _is_json_array(path):
        return _jsonl_table(path)
    located = list(_json_array_rows(path))
    table = _table_from_rows([row for _, row in located], path, lambda i: f"item {i + 1}")
    return table, row_namer(path, "item")


def _table_from_rows(rows: list[dict], path: Path, name: Callable[[int], str]) -> pa.Table:
    """Rows -> table, with a named row when one field holds values of different JSON types."""
    if not rows:
        return pa.table({})
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError):
        pass
    names = dict.fromkeys(k for row in rows for k in row)
    for key in names:
        first: tuple[int, str] | None = None
        for i, row in enumerate(rows):
            value = row.get(key)
            if value is None:
                continue
            kind = _json_kind(value)
            if first is None:
                first = (i, kind)
            elif kind != first[1]:
                raise DataError(
                    f"{path}: {name(i)}: field {key!r} is a {kind} here but a {first[1]} "
                    f"in {name(first[0])}; a field must have one type in every row"
                )
    raise DataError(f"{path}: cannot read rows into a table")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _delimited_table(path: Path, delimiter: str) -> tuple[pa.Table, Namer]:
    import pyarrow.csv as pcsv

    with path.open("r", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise DataError(f"{path}: file is empty (no header row)")
    # Every column is text: a label column of digits must not turn into numbers, and an empty
    # cell is an empty string, not a missing value (a missing column is still an error).
    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter=delimiter),
        convert_options=pcsv.ConvertOptions(
            column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=False
        ),
    )
    # Rows, not lines: a quoted cell may span lines.
    return table, row_namer(path)


def _parquet_table(path: Path) -> tuple[pa.Table, Namer]:
    import pyarrow.parquet as pq

    return pq.read_table(path), row_namer(path)


def _txt_table(path: Path, text_column: str) -> tuple[pa.Table, Namer]:
    documents, starts = split_paragraphs(path.read_text(encoding="utf-8"))
    table = pa.table({text_column: pa.array(documents, pa.string())})
    return table, lambda i: f"{path}: line {starts[i]}"


def split_paragraphs(text: str) -> tuple[list[str], list[int]]:
    """Documents separated by blank lines, and the 1-based line where each starts."""
    documents: list[str] = []
    starts: list[int] = []
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                starts.append(number)
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents, starts


# ------------------------------------------------------------------------------ streaming


def iter_rows(path: Path, text_column: str = "text") -> Iterator[tuple[str, dict]]:
    """(place, row) for every row of a file, read as it goes; place reads "line 7".

    A .txt file gives one `text_column` row per non-blank line. Empty files give no rows.
    """
    suffix = check_suffix(path)
    try:
        if suffix == ".jsonl":
            yield from _jsonl_rows(path)
        elif suffix == ".json":
            yield from _json_array_rows(path) if _is_json_array(path) else _jsonl_rows(path)
        elif suffix in (".csv", ".tsv"):
            yield from _delimited_rows(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            yield from _txt_lines(path, text_column)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read file: {short_reason(exc)}") from None


def _is_json_array(path: Path) -> bool:
    """Whether a .json file holds one array (else it is read as JSON Lines)."""
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
    return first == "["


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {number}: expected a JSON object per line, "
                    f"got {type(row).__name__}"
                )
            yield f"line {number}", row


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        try:
            items = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    for number, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: item {number}: expected a JSON object, got {type(row).__name__}"
            )
        yield f"item {number}", row


def _delimited_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            yield f"line {reader.line_num}", dict(row)


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    number = 0
    for record_batch in pq.ParquetFile(path).iter_batches(batch_size=STREAM_BATCH_ROWS):
        for row in record_batch.to_pylist():
            number += 1
            yield f"row {number}", row


def _txt_lines(path: Path, text_column: str) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield f"line {number}", {text_column: line.rstrip("\n")}


# ------------------------------------------------------------------------ Hugging Face hub


@dataclass(frozen=True)
class HfSpec:
    """A parsed `hf:<dataset>[:<config>]:<split>` source."""

    dataset: str
    config: str | None
    split: str


def source_name(path: str) -> str:
    """A readable name for a source: the file stem, directory name or hf dataset."""
    if path.startswith("hf:"):
        hf = parse_hf_spec(path)
        return ":".join(p for p in (hf.dataset, hf.config, hf.split) if p)
    p = Path(path)
    return p.stem if p.suffix else p.name


def parse_hf_spec(spec: str) -> HfSpec:
    """`hf:imdb:train` -> HfSpec("imdb", None, "train"); `hf:glue:sst2:validation` -> with config."""
    body = spec[3:] if spec.startswith("hf:") else spec
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise DataError(
            f"bad Hugging Face source {spec!r}: expected hf:<dataset>:<split> or "
            "hf:<dataset>:<config>:<split>, e.g. hf:imdb:train or hf:glue:sst2:validation"
        )
    parts = [p.strip() for p in parts]
    if len(parts) == 2:
        return HfSpec(parts[0], None, parts[1])
    return HfSpec(parts[0], parts[1], parts[2])


def load_hf_split(spec: str) -> Any:
    """The `datasets.Dataset` of an `hf:<dataset>[:<config>]:<split>` source (from the local
    cache, or downloaded and prepared by `datasets` when the hub is reachable)."""
    hf = parse_hf_spec(spec)
    try:
        import datasets

        return datasets.load_dataset(hf.dataset, hf.config, split=hf.split)
    except Exception as exc:
        raise DataError(
            f"{spec}: cannot load Hugging Face dataset {hf.dataset!r}"
            + (f" (config {hf.config!r})" if hf.config else "")
            + f" split {hf.split!r}: {short_reason(exc)} "
            "(is the hub reachable, or the dataset in the local cache?)"
        ) from None


def read_hf(spec: str, loaded: Any = None) -> RawTable:
    """A Hugging Face dataset split (`hf:<dataset>[:<config>]:<split>`) as a table; `loaded`:
    its `datasets.Dataset` when already loaded (loading again may ask the hub again)."""
    ds = loaded if loaded is not None else load_hf_split(spec)
    table = named_class_labels(ds.with_format("arrow")[:], ds.features)
    if table.num_rows == 0:
        raise DataError(f"{spec}: dataset split is empty (no rows)")
    return RawTable(table, row_namer(spec))


def named_class_labels(table: pa.Table, features: Any) -> pa.Table:
    """ClassLabel columns (`features`: a `datasets.Features`) as their label names, so they
    match model.labels; the -1 "no label" id becomes a missing value."""
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel) and name in table.column_names:
            ids = table.column(name).combine_chunks()
            ids = pc.if_else(pc.less(ids, 0), pa.scalar(None, ids.type), ids)
            names = pc.take(pa.array(feature.names, pa.string()), ids)
            table = table.set_column(table.column_names.index(name), name, names)
    return table
