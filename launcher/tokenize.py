"""Rows to token ids: the tokenization of every data format, shared by the data stage (training
splits) and the batch stage (evaluation rows tokenized exactly as in training).

Each function takes a batch of canonical Arrow rows and returns tokenized Arrow rows with
input_ids, labels (-100 where no loss is taken), num_tokens, row_id and the passthrough columns.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from launcher.chat import DROP_TOO_LONG, ChatEncoder, Dropped
from launcher.collate import IGNORE_INDEX
from launcher.records import DataError

# Row ids of text chunks: (document row id << PIECE_BITS) | piece index.
PIECE_BITS = 20
TOKENIZE_BATCH_ROWS = 256
# Columns copied unchanged from raw rows to tokenized rows.
PASSTHROUGH = ("source", "source_id")

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
"""Default instruction template; `{input_block}` becomes "### Input:\\n<input>\\n\\n" when the
row has a non-empty input and disappears otherwise. User templates use {instruction} and {input}."""


def render_prompt(template: str | None, instruction: str, input_text: str) -> str:
    """The prompt of one instruction row (everything the model reads before the response)."""
    if template is None:
        block = f"### Input:\n{input_text}\n\n" if input_text.strip() else ""
        values = {"instruction": instruction, "input_block": block}
    else:
        values = {"instruction": instruction, "input": input_text}
    # One pass over the template, not str.format or chained replaces: templates may contain
    # other braces, and a row's text may itself contain "{input}".
    return _PLACEHOLDER.sub(lambda m: values.get(m[1], m[0]), template or DEFAULT_PROMPT_TEMPLATE)


_PLACEHOLDER = re.compile(r"\{(instruction|input_block|input)\}")


def check_prompt_template(template: str | None) -> None:
    if template is not None and "{instruction}" not in template:
        raise DataError(
            "data.prompt_template must contain {instruction} (and may contain {input}); "
            f"got {template!r}"
        )


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def tokenize_text(table: pa.Table, tokenizer: Any, max_length: int) -> pa.Table:
    """Causal LM text: each document + EOS, cut into max_length chunks (chunks of 1 token,
    which predict nothing, are dropped). Row id: (document row id << PIECE_BITS) | chunk."""
    docs = _ids(tokenizer, table.column("text").to_pylist(), special=True)
    eos = _eos(tokenizer)
    row_ids = table.column("row_id").to_pylist()
    out = _Rows(table)
    for i, ids in enumerate(docs):
        ids = list(ids) + eos
        for piece, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start : start + max_length]
            if len(chunk) < 2:
                continue
            out.add(chunk, chunk, (row_ids[i] << PIECE_BITS) | piece, origin=i)
    return out.table()


def tokenize_packed(table: pa.Table, tokenizer: Any, max_length: int) -> pa.Table:
    """Causal LM text packed into full max_length sequences.

    Examples are concatenated with EOS after each; a sequence holds several examples and a long
    example continues in the next sequence. position_ids restart at 0 where each example (and
    each sequence) starts, and the first token of each example gets label -100, so no loss
    crosses an example boundary. Attention stays inside each example only for models whose mask
    is built from position_ids: transformers' create_causal_mask does it (GPT-2, Llama, ...) when
    the forward gets no attention_mask and no KV cache, which is what launcher.collate's
    `collate` and `model_inputs` arrange. Other models, prefix tuning (it brings a cache) and custom attention
    code attend across example boundaries within a packed sequence.
    Packing is per map_batches batch: the last sequence of a batch may be shorter.
    Row id: (row id of the sequence's first example << PIECE_BITS) | sequences started by it.
    """
    docs = _ids(tokenizer, table.column("text").to_pylist(), special=True)
    eos = _eos(tokenizer)
    row_ids = table.column("row_id").to_pylist()
    out = _Rows(table, with_positions=True)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    first: tuple[int, int] | None = None  # (doc index, piece) that opened the current sequence
    pieces = [0] * len(docs)

    def flush() -> None:
        nonlocal ids, labels, positions, first
        if len(ids) >= 2 and first is not None:
            opener, piece = first
            out.add(
                ids, labels, (row_ids[opener] << PIECE_BITS) | piece, opener, positions=positions
            )
        ids, labels, positions, first = [], [], [], None

    for d, doc in enumerate(docs):
        tokens = list(doc) + eos
        while tokens:
            if first is None:
                first = (d, pieces[d])
                pieces[d] += 1
            take, tokens = tokens[: max_length - len(ids)], tokens[max_length - len(ids) :]
            # An example opening mid-sequence must not be predicted from the one before it.
            labels += ([IGNORE_INDEX] if ids else take[:1]) + take[1:]
            # Positions restart for every example and for an example continued in a new sequence.
            positions += list(range(len(take)))
            ids += take
            if len(ids) == max_length:
                flush()
    flush()
    return out.table()


def tokenize_instruction(
    table: pa.Table, tokenizer: Any, max_length: int, template: str | None
) -> pa.Table:
    """Prompt + response + EOS; labels are -100 on every prompt token, so only the response
    is learned. A row longer than max_length is dropped ("too_long", counted as in
    tokenize_chat), not cut: a response cut short loses its EOS, and training on it teaches
    the model not to stop."""
    prompts = [
        render_prompt(template, ins, inp)
        for ins, inp in zip(
            table.column("instruction").to_pylist(),
            table.column("input").to_pylist(),
            strict=True,
        )
    ]
    prompt_ids = _ids(tokenizer, prompts, special=True)
    response_ids = _ids(tokenizer, table.column("output").to_pylist(), special=False)
    eos = _eos(tokenizer)
    row_ids = table.column("row_id").to_pylist()
    out = _Rows(table)
    dropped = 0
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        response = list(response) + eos
        if len(prompt) + len(response) > max_length or not response:
            dropped += 1
            continue
        out.add(list(prompt) + response, [IGNORE_INDEX] * len(prompt) + response, row_ids[i], i)
    result = out.table()
    if dropped:
        result = result.replace_schema_metadata({DROPPED_KEY: json.dumps({DROP_TOO_LONG: dropped})})
    return result


DROPPED_KEY = b"ftlaunch.dropped"
"""Schema metadata key of a tokenized batch: JSON {reason: rows} for rows a batch function
did not take whole: left out (chat and instruction rows too long to train, "too_long") or kept
cut short (classification text longer than max_length, TRUNCATED)."""
TRUNCATED = "truncated"


def dropped_rows(table: pa.Table) -> dict[str, int]:
    """Rows a batch function left out on purpose, by reason (empty for most formats)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[DROPPED_KEY]) if DROPPED_KEY in meta else {}


def chat_encoder(recipe: Any, tokenizer: Any) -> ChatEncoder:
    """The ChatEncoder of a chat recipe (loads and checks the chat template)."""
    d = recipe.data
    return ChatEncoder(
        tokenizer,
        max_length=d.max_length,
        chat_template=d.chat_template,
        train_on=d.train_on,
        system_prompt=d.system_prompt,
        field_name=d.messages_field,
    )


def tokenize_chat(table: pa.Table, encoder: ChatEncoder) -> pa.Table:
    """Conversations rendered with the chat template; labels only on the trained turns.

    The `messages` column holds each row's messages as JSON (the driver checked and normalized
    them). Rows whose first trained turn does not fit max_length are dropped; the reasons and
    counts travel in the schema metadata (`dropped_rows`).
    """
    row_ids = table.column("row_id").to_pylist()
    out = _Rows(table)
    dropped: collections.Counter[str] = collections.Counter()
    for i, text in enumerate(table.column("messages").to_pylist()):
        example = encoder.encode_row(json.loads(text), row_ids[i])
        if isinstance(example, Dropped):
            dropped[example.reason] += 1
            continue
        out.add(example.input_ids, example.labels, row_ids[i], origin=i)
    result = out.table()
    if dropped:
        result = result.replace_schema_metadata({DROPPED_KEY: json.dumps(dict(dropped))})
    return result


def pack_examples(table: pa.Table, max_length: int) -> pa.Table:
    """Tokenized examples (input_ids + labels) packed into sequences of at most max_length.

    Whole examples only (an example is never split): each opens a new sequence when it does not
    fit in the current one. position_ids restart at 0 for every example and the first label of
    each example is -100, as in `tokenize_packed`. Row id: the first example's row id.
    """
    ids_col = table.column("input_ids").to_pylist()
    labels_col = table.column("labels").to_pylist()
    row_ids = table.column("row_id").to_pylist()
    out = _Rows(table, with_positions=True)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    opener = -1
    for i, (example, example_labels) in enumerate(zip(ids_col, labels_col, strict=True)):
        if ids and len(ids) + len(example) > max_length:
            out.add(ids, labels, row_ids[opener], opener, positions=positions)
            ids, labels, positions = [], [], []
        if not ids:
            opener = i
        labels += ([IGNORE_INDEX] if ids else example_labels[:1]) + example_labels[1:]
        positions += list(range(len(example)))
        ids += example
    if ids:
        out.add(ids, labels, row_ids[opener], opener, positions=positions)
    return out.table().replace_schema_metadata(table.schema.metadata)


def _chat_batches(
    table: pa.Table, encoder: ChatEncoder, packing: bool, max_length: int
) -> pa.Table:
    examples = tokenize_chat(table, encoder)
    return pack_examples(examples, max_length) if packing else examples


_DROP_RULE = {
    "instruction": "instruction rows whose response does not fit",
    "chat": "chat rows whose first trained assistant turn does not fit",
}


def no_examples_left(split: str, rows_in: int, data_format: str, max_length: int) -> DataError:
    """The error of a split that tokenization left empty, with the format's rule for dropping
    rows (the driver path and the streamed tasks say the same)."""
    rule = _DROP_RULE.get(data_format, "rows that do not fit")
    return DataError(
        f"data.{split}: no examples left after tokenization ({rows_in} rows in; {rule} "
        f"data.max_length={max_length} are dropped)"
    )


def tokenize_classification(table: pa.Table, tokenizer: Any, max_length: int) -> pa.Table:
    """Text truncated to max_length (with the tokenizer's special tokens); label id per row."""
    texts = table.column("text").to_pylist()
    batch = (
        tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=max_length, verbose=False
        )
        if texts
        else None
    )
    encoded = batch["input_ids"] if batch is not None else []
    truncated = _count_truncated(tokenizer, texts, batch, max_length) if texts else 0
    columns: dict[str, pa.Array] = {
        "input_ids": pa.array(encoded, pa.list_(pa.int32())),
        "attention_mask": pa.array([[1] * len(x) for x in encoded], pa.list_(pa.int8())),
        "labels": table.column("label").combine_chunks().cast(pa.int64()),
        "num_tokens": pa.array([len(x) for x in encoded], pa.int32()),
        "row_id": table.column("row_id").combine_chunks().cast(pa.int64()),
    }
    for name in PASSTHROUGH:
        if name in table.column_names:
            columns[name] = table.column(name).combine_chunks()
    out = pa.table(columns)
    if truncated:
        out = out.replace_schema_metadata({DROPPED_KEY: json.dumps({TRUNCATED: truncated})})
    return out


def _count_truncated(tokenizer: Any, texts: list, batch: Any, max_length: int) -> int:
    """Rows whose text was cut at max_length. A fast tokenizer keeps what it cut off in each
    encoding's `overflowing`; a slow one tokenizes again, whole, only the rows that reached the
    limit (they are few unless max_length is short for the data, and then they are the news)."""
    encodings = getattr(batch, "encodings", None)
    if encodings is not None:
        return sum(1 for e in encodings if e.overflowing)
    full = [texts[i] for i, ids in enumerate(batch["input_ids"]) if len(ids) >= max_length]
    if not full:
        return 0
    lengths = tokenizer(full, add_special_tokens=True, truncation=False, verbose=False)
    return sum(len(ids) > max_length for ids in lengths["input_ids"])


class _Rows:
    """Accumulates tokenized causal-LM rows and builds the Arrow table; pass-through columns
    (source, source_id) are copied from the input row each output row came from."""

    TYPES: dict[str, pa.DataType] = {  # noqa: RUF012 - constant
        "input_ids": pa.list_(pa.int32()),
        "attention_mask": pa.list_(pa.int8()),
        "labels": pa.list_(pa.int32()),
        "position_ids": pa.list_(pa.int32()),
        "num_tokens": pa.int32(),
        "row_id": pa.int64(),
    }

    def __init__(self, source: pa.Table, with_positions: bool = False):
        names = ["input_ids", "attention_mask", "labels", "num_tokens", "row_id"]
        if with_positions:
            names.append("position_ids")
        self.columns: dict[str, list] = {name: [] for name in names}
        self.passthrough = {
            name: source.column(name).combine_chunks()
            for name in PASSTHROUGH
            if name in source.column_names
        }
        self.origins: list[int] = []

    def add(
        self,
        ids: list[int],
        labels: list[int],
        row_id: int,
        origin: int,
        positions: list[int] | None = None,
    ) -> None:
        c = self.columns
        c["input_ids"].append(list(ids))
        c["attention_mask"].append([1] * len(ids))
        c["labels"].append(list(labels))
        c["num_tokens"].append(len(ids))
        c["row_id"].append(row_id)
        if "position_ids" in c:
            c["position_ids"].append(list(positions or ()))
        self.origins.append(origin)

    def table(self) -> pa.Table:
        columns = {k: pa.array(v, self.TYPES[k]) for k, v in self.columns.items()}
        origins = pa.array(self.origins, pa.int64())
        for name, values in self.passthrough.items():
            columns[name] = values.take(origins)
        return pa.table(columns)


def tokenizer_for_batches(recipe: Any, tokenizer: Any) -> Callable[[pa.Table], pa.Table]:
    """The batch function of this recipe's format: Arrow rows in, tokenized Arrow rows out."""
    d = recipe.data
    if d.format == "classification":
        return functools.partial(
            tokenize_classification, tokenizer=tokenizer, max_length=d.max_length
        )
    if d.format == "instruction":
        check_prompt_template(d.prompt_template)
        return functools.partial(
            tokenize_instruction,
            tokenizer=tokenizer,
            max_length=d.max_length,
            template=d.prompt_template,
        )
    if d.format == "chat":
        return functools.partial(
            _chat_batches,
            encoder=chat_encoder(recipe, tokenizer),
            packing=d.packing,
            max_length=d.max_length,
        )
    if d.packing:
        return functools.partial(tokenize_packed, tokenizer=tokenizer, max_length=d.max_length)
    return functools.partial(tokenize_text, tokenizer=tokenizer, max_length=d.max_length)
