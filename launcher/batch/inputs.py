"""Input rows of a batch job: read with their place in the file, validated where the file and
line can still be named, given an id, and put into Ray's object store in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from launcher.errors import BadInputError
from launcher.records import DataError, iter_rows

ID_COLUMN = "id"
ROW_ID_COLUMN = "row_id"
INTERNAL_PREFIX = "_ftl_"
LABEL_ID = INTERNAL_PREFIX + "label_id"
# exact_match's reference, under a name of its own: the generated text is written to `output`,
# which is also the usual name of an instruction row's reference
REFERENCE = INTERNAL_PREFIX + "reference"
# An instruction row as its run trained on it: the rendered prompt, the response and its EOS.
PROMPT = INTERNAL_PREFIX + "prompt"
COMPLETION = INTERNAL_PREFIX + "completion"
# Input chunks put into Ray's object store: at most this many rows or (roughly) bytes each.
CHUNK_ROWS = 4096
CHUNK_BYTES = 4 * 2**20


class BatchInputError(BadInputError, ValueError):
    """Bad input for a batch job (model reference, data file, option): the CLI exits with 2."""


def iter_records(path: str | Path, text_column: str = "text") -> Iterator[tuple[str, dict]]:
    """(location, row) for every row of a data file; location reads "file, line N"."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"data file not found: {path}")
    try:
        for place, row in iter_rows(path, text_column=text_column):
            yield f"{path}, {place}", row
    except DataError as exc:
        raise BatchInputError(str(exc)) from None


def require_text(where: str, row: dict, name: str, hint: str = "") -> str:
    """The string in `row[name]`, or a BatchInputError naming the place and the fields present."""
    if name not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise BatchInputError(f"{where}: no `{name}` field (fields: {fields}){hint}")
    value = row[name]
    if not isinstance(value, str):
        raise BatchInputError(f"{where}: `{name}` must be a string, got {type(value).__name__}")
    return value


PROMPT_HINT = '; a prompts .jsonl needs {"prompt": "..."} on every line (or use a .txt file)'


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl (field `prompt`) or .txt (one per line) file; clear errors."""
    path = Path(path)
    prompts = [require_text(w, row, "prompt", PROMPT_HINT) for w, row in prompt_records(path)]
    if not prompts:
        raise BatchInputError(f"{path}: no prompts in the file")
    return prompts


def prompt_records(path: Path) -> Iterator[tuple[str, dict]]:
    """The rows of a prompts file (.jsonl/.json rows, or one `prompt` per .txt line)."""
    if path.suffix.lower() not in (".jsonl", ".json", ".txt"):
        raise BatchInputError(
            f"{path}: prompts must be a .jsonl file with a `prompt` field or a .txt file "
            "with one prompt per line"
        )
    return iter_records(path, text_column="prompt")


RowCheck = Callable[[str, dict], dict]


def stage_rows(
    records: Iterator[tuple[str, dict]], check: RowCheck | None = None, chunk_rows: int = CHUNK_ROWS
) -> tuple[list, int]:
    """Validate rows, give each an id, and put them in Ray's object store in chunks.

    Rows keep their `id` when the first row has one (every row must then); otherwise each
    gets `row_id`, its 0-based position in the file. Returns (object refs of Arrow tables,
    number of rows).
    """
    import pyarrow as pa
    import ray

    refs: list = []
    chunk: list[dict] = []
    has_id: bool | None = None
    count = chunk_bytes = 0
    for where, row in records:
        if has_id is None:
            has_id = ID_COLUMN in row
        if has_id and ID_COLUMN not in row:
            raise BatchInputError(f"{where}: no `id` field, but earlier rows have one")
        row = check(where, row) if check else row
        if not has_id:
            row = {**row, ROW_ID_COLUMN: count}
        chunk.append(row)
        chunk_bytes += _approx_size(row)
        count += 1
        if len(chunk) >= chunk_rows or chunk_bytes >= CHUNK_BYTES:
            refs.append(ray.put(pa.Table.from_pylist(chunk)))
            chunk, chunk_bytes = [], 0
    if chunk:
        refs.append(ray.put(pa.Table.from_pylist(chunk)))
    return refs, count


def _approx_size(row: dict) -> int:
    """Rough in-memory size of a row: string lengths, 16 bytes for anything else."""
    return sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in row.values())


def first_record(records: Iterator[tuple[str, dict]], path: str | Path) -> tuple[str, dict]:
    """The first (location, row), taken off `records`; the job's options may depend on it."""
    try:
        return next(records)
    except StopIteration:
        raise BatchInputError(f"{path}: no rows to process") from None


def chain_first(
    first: tuple[str, dict], rest: Iterator[tuple[str, dict]]
) -> Iterator[tuple[str, dict]]:
    """`first` put back in front of the records it was taken from."""
    yield first
    yield from rest
