"""launcher.data: sources, validation errors, splits, mixing, balancing, tokenization, collation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launcher import data as D
from launcher import records
from launcher import tokenize as T
from launcher.collate import make_collate, model_inputs
from launcher.data import DataError, prepare_data
from launcher.dev.synthetic import instruction_rows, review_rows, story_lines, write_jsonl
from launcher.recipe import validate_data

LABELS = ["negative", "positive"]


def make_recipe(data: dict, *, task: str = "causal_lm", model: str = "tiny", **sections):
    """A validated recipe with the given data section (and classification model when asked)."""
    doc = {
        "name": "t",
        "model": {"name_or_path": str(model), "task": task},
        "data": data,
        "checkpoint": {"metric": None},  # some recipes here have no validation split
    }
    if task == "classification":
        doc["model"]["labels"] = LABELS
        doc["data"].setdefault("format", "classification")
    doc.update(sections)
    return validate_data(doc)


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def bert_tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def message(exc_info) -> str:
    return str(exc_info.value)


# ----------------------------------------------------------------------------- sources


def test_hf_spec_parsing():
    assert records.parse_hf_spec("hf:imdb:train") == records.HfSpec("imdb", None, "train")
    assert records.parse_hf_spec("hf:nyu-mll/glue:sst2:validation") == records.HfSpec(
        "nyu-mll/glue", "sst2", "validation"
    )
    for bad in ("hf:imdb", "hf:a:b:c:d", "hf::train", "hf:imdb:"):
        with pytest.raises(DataError, match=r"expected hf:<dataset>:<split> or"):
            records.parse_hf_spec(bad)
    assert D.source_name("hf:glue:sst2:train") == "glue:sst2:train"
    assert D.source_name("data/reviews.jsonl") == "reviews"
    assert D.source_name("data/reviews") == "reviews"


def test_hf_source_that_cannot_load_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no hub here: fail at once, no retries
    fields = D.fields_for(make_recipe({"train": "x"}))
    with pytest.raises(DataError) as exc:
        D.read_source("hf:no-such-org/no-such-dataset:sst2:train", fields)
    assert message(exc).startswith(
        "hf:no-such-org/no-such-dataset:sst2:train: cannot load Hugging Face dataset "
        "'no-such-org/no-such-dataset' (config 'sst2') split 'train': "
    )
    assert message(exc).endswith("(is the hub reachable, or the dataset in the local cache?)")


def test_hf_class_labels_become_names():
    import datasets

    ds = datasets.Dataset.from_dict(
        {"sentence": ["good", "bad", "unlabelled"], "label": [1, 0, -1]},
        features=datasets.Features(
            {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)}
        ),
    )
    table = records.named_class_labels(ds.with_format("arrow")[:], ds.features)
    assert table.column("label").to_pylist() == ["positive", "negative", None]
    fields = D.Fields({"text": "sentence", "label": "label"}, labels=tuple(LABELS))
    where = records.row_namer(Path("hf:glue:sst2:test"))
    assert D.canonical_columns(table.slice(0, 2), fields, where).column("label").to_pylist() == [
        1,
        0,
    ]
    with pytest.raises(DataError, match=r"^hf:glue:sst2:test: row 3: missing field 'label'"):
        D.canonical_columns(table, fields, where)


def _write_all_formats(rows: list[dict], root: Path) -> dict[str, Path]:
    import csv

    root.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": write_jsonl(rows, root / "d.jsonl")}
    paths["json"] = root / "d.json"
    paths["json"].write_text(json.dumps(rows))
    for name, delimiter in (("csv", ","), ("tsv", "\t")):
        paths[name] = root / f"d.{name}"
        with paths[name].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    paths["parquet"] = root / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows = review_rows(12, seed=1)
    rows[3]["text"] = 'quoted, "comma" text'
    fields = D.fields_for(make_recipe({"train": "x"}, task="classification"))
    expected = None
    for kind, path in _write_all_formats(rows, tmp_path).items():
        table = D.read_source(str(path), fields).table
        assert table.column_names == ["text", "label"], kind
        got = table.to_pylist()
        if expected is None:
            expected = got
        assert got == expected, kind
    assert [r["text"] for r in expected] == [r["text"] for r in rows]
    assert [r["label"] for r in expected] == [LABELS.index(r["label"]) for r in rows]


def test_directory_reads_files_recursively_in_order(tmp_path):
    write_jsonl([{"text": "b1"}, {"text": "b2"}], tmp_path / "d" / "b.jsonl")
    write_jsonl([{"text": "a1"}], tmp_path / "d" / "a.jsonl")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "c.txt").write_text("c1 line\nstill c1\n\n\nc2\n")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    write_jsonl([{"text": "hidden"}], tmp_path / "d" / ".cache" / "h.jsonl")
    fields = D.fields_for(make_recipe({"train": "x"}))
    raw = D.read_source(str(tmp_path / "d"), fields)
    assert raw.table.column("text").to_pylist() == ["a1", "b1", "b2", "c1 line\nstill c1", "c2"]
    # Row names point into the right file.
    assert raw.where(2) == f"{tmp_path / 'd' / 'b.jsonl'}: line 2"
    assert raw.where(4) == f"{tmp_path / 'd' / 'sub' / 'c.txt'}: line 5"


def test_txt_documents_are_paragraphs():
    docs, starts = records.split_paragraphs("one\ntwo\n\n\nthree\n  \nfour\n")
    assert docs == ["one\ntwo", "three", "four"]
    assert starts == [1, 5, 7]


def test_instruction_input_is_optional(tmp_path):
    path = write_jsonl(
        [
            {"instruction": "a", "output": "x"},
            {"instruction": "b", "input": None, "output": "y"},
            {"instruction": "c", "input": "ctx", "output": "z"},
        ],
        tmp_path / "i.jsonl",
    )
    fields = D.fields_for(make_recipe({"train": "x", "format": "instruction"}))
    table = D.read_source(str(path), fields).table
    assert table.column("input").to_pylist() == ["", "", "ctx"]


# -------------------------------------------------------------------------- bad data


def _classification_fields():
    return D.fields_for(make_recipe({"train": "x"}, task="classification"))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "good", "label": "positive"}\n'
        "\n"  # blank lines are skipped but still counted in line numbers
        '{"text": "also good", "label": "negative"}\n'
        '{"label": "negative"}\n'
    )
    with pytest.raises(DataError) as exc:
        D.read_source(str(path), _classification_fields())
    assert message(exc) == f"{path}: line 4: missing field 'text' (data.text_field)"


def test_field_absent_from_every_row_lists_fields_present(tmp_path):
    path = write_jsonl([{"body": "x", "label": "positive"}], tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as exc:
        D.read_source(str(path), _classification_fields())
    assert message(exc) == (
        f"{path}: line 1: missing field 'text' (data.text_field); fields present: body, label"
    )


def test_unknown_label_names_row_and_allowed_labels(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,positive\nodd,maybe\n")
    with pytest.raises(DataError) as exc:
        D.read_source(str(path), _classification_fields())
    assert message(exc) == (
        f"{path}: row 2: field 'label' has label 'maybe', which is not in model.labels "
        "[negative, positive]"
    )


def test_numeric_labels_are_matched_by_name_with_a_hint(tmp_path):
    path = write_jsonl([{"text": "a", "label": 1}], tmp_path / "n.jsonl")
    with pytest.raises(
        DataError, match=r"line 1: field 'label' has label '1'.*list them as strings"
    ):
        D.read_source(str(path), _classification_fields())


def test_text_field_of_wrong_type(tmp_path):
    path = write_jsonl([{"text": 5}], tmp_path / "n.jsonl")
    fields = D.fields_for(make_recipe({"train": "x"}))
    with pytest.raises(DataError) as exc:
        D.read_source(str(path), fields)
    assert (
        message(exc)
        == f"{path}: line 1: field 'text' (data.text_field) must be text, got int64 values"
    )


def test_empty_files(tmp_path):
    fields = D.fields_for(make_recipe({"train": "x"}))
    for name, content in (
        ("e.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("e.json", "[]"),
        ("e.csv", "text\n"),
        ("e.txt", "\n \n"),
    ):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DataError) as exc:
            D.read_source(str(path), fields)
        assert message(exc) == f"{path}: file is empty (no rows)", name


def test_missing_file_and_empty_directory(tmp_path):
    fields = D.fields_for(make_recipe({"train": "x"}))
    with pytest.raises(DataError) as exc:
        D.read_source(str(tmp_path / "nope.jsonl"), fields)
    assert message(exc) == f"{tmp_path / 'nope.jsonl'}: file not found"
    # in a recipe: the setting that names it, and what a relative path is taken from
    with pytest.raises(DataError) as exc:
        D.load_tables(make_recipe({"train": "data/nope.jsonl"}), base_dir=tmp_path)
    assert message(exc) == (
        f"data.train: {tmp_path}/data/nope.jsonl: file not found (a relative path is taken "
        f"from {tmp_path})"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory has no data files \(looked for"):
        D.read_source(str(tmp_path / "empty"), fields)


def test_unreadable_files(tmp_path):
    fields = D.fields_for(make_recipe({"train": "x"}))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError) as exc:
        D.read_source(str(bad_json), fields)
    assert message(exc).startswith(f"{bad_json}: line 2: not valid JSON (")

    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(DataError) as exc:
        D.read_source(str(not_object), fields)
    assert message(exc) == f"{not_object}: line 2: expected a JSON object per line, got list"

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError) as exc:
        D.read_source(str(mixed), fields)
    assert message(exc) == (
        f"{mixed}: line 2: field 'text' is a number here but a string in line 1; "
        "a field must have one type in every row"
    )

    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"^{corrupt}: cannot read file: "):
        D.read_source(str(corrupt), fields)

    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad utf-8")
    with pytest.raises(DataError, match=rf"^{binary}: cannot read file: .*utf-8"):
        D.read_source(str(binary), fields)

    unsupported = tmp_path / "d.xml"
    unsupported.write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'"):
        D.read_source(str(unsupported), fields)


def test_txt_cannot_hold_labelled_rows(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"\.txt files hold plain text only"):
        D.read_source(str(path), _classification_fields())


def test_bad_prompt_template_and_duplicate_source_names(tmp_path):
    with pytest.raises(DataError, match=r"must contain \{instruction\}"):
        T.check_prompt_template("Q: {input}\nA:")
    path = write_jsonl([{"text": "a"}] * 4, tmp_path / "a.jsonl")
    recipe = make_recipe({"train": [{"path": str(path)}, {"path": str(path)}]})
    with pytest.raises(DataError, match=r"share the name\(s\) a: give each source a distinct"):
        D.load_tables(recipe)


def test_too_few_rows_to_carve(tmp_path):
    path = write_jsonl([{"text": "only one"}], tmp_path / "one.jsonl")
    with pytest.raises(DataError, match=r"has 1 rows: too few to carve validation 0.1"):
        D.load_tables(make_recipe({"train": str(path)}))


def test_relative_paths_resolve_against_base_dir(tmp_path):
    write_jsonl([{"text": f"t{i}"} for i in range(10)], tmp_path / "rel.jsonl")
    tables = D.load_tables(make_recipe({"train": "rel.jsonl"}), base_dir=tmp_path)
    assert tables["train"].num_rows + tables["validation"].num_rows == 10


def test_a_file_uri_source_reads_as_its_path(tmp_path):
    """file:// names a local path everywhere a source is read: a file, a directory, a glob."""
    for i in range(2):
        write_jsonl([{"text": f"f{i}-{j}"} for j in range(5)], tmp_path / "d" / f"s-{i}.jsonl")
    fields = D.Fields({"text": "text"})
    for spec in ("d/s-0.jsonl", "d", "d/s-*.jsonl"):
        by_path = D.read_source(str(tmp_path / spec), fields).table
        by_uri = D.read_source(f"file://{tmp_path / spec}", fields).table
        assert by_uri.to_pylist() == by_path.to_pylist() and by_uri.num_rows in (5, 10)
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.jsonl: file not found"):
        D.read_source(f"file://{tmp_path}/nope.jsonl", fields)
    uri = make_recipe({"train": f"file://{tmp_path}/d"})
    assert (
        D.load_tables(uri)["train"]
        == D.load_tables(make_recipe({"train": str(tmp_path / "d")}))["train"]
    )


def test_glob_sources_read_every_match_in_order_and_name_the_file(tmp_path):
    for i in range(3):
        write_jsonl([{"text": f"f{i}-{j}"} for j in range(2)], tmp_path / f"s-{i}.jsonl")
    (tmp_path / "other.jsonl").write_text('{"text": "unmatched"}\n')
    fields = D.Fields({"text": "text"})
    table = D.read_source(str(tmp_path / "s-*.jsonl"), fields).table
    assert table.column("text").to_pylist() == [f"f{i}-{j}" for i in range(3) for j in range(2)]
    (tmp_path / "s-3.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"s-3\.jsonl.*line 2.*missing field 'text'"):
        D.read_source(str(tmp_path / "s-*.jsonl"), fields)
    with pytest.raises(DataError, match=r"no files match this pattern"):
        D.read_source(str(tmp_path / "none-*.parquet"), fields)


def test_data_errors_raised_in_ray_tasks_are_unwrapped():
    from ray.exceptions import RayTaskError

    original = DataError("rows.jsonl: line 7: missing field 'text' (data.text_field)")
    wrapped = RayTaskError("map_batches", "Traceback ...\nDataError: ...", original)
    wrapped = wrapped.as_instanceof_cause()
    try:
        raise RuntimeError("Ray Data execution failed") from wrapped
    except RuntimeError as exc:
        assert D.data_error_in(exc) is original
    assert D.data_error_in(ValueError("not data")) is None


# ------------------------------------------------------------- splits, mixing, balance


def _texts(table: pa.Table) -> list[str]:
    return table.column("text").to_pylist()


def test_split_is_deterministic_disjoint_and_sized(tmp_path):
    path = write_jsonl([{"text": f"row {i}"} for i in range(200)], tmp_path / "d.jsonl")
    split = {"validation": 0.1, "test": 0.2, "seed": 7}
    first = D.load_tables(make_recipe({"train": str(path), "split": split}))
    again = D.load_tables(make_recipe({"train": str(path), "split": split}))
    other = D.load_tables(make_recipe({"train": str(path), "split": {**split, "seed": 8}}))
    assert {k: t.num_rows for k, t in first.items()} == {
        "train": 140,
        "validation": 20,
        "test": 40,
    }
    for name in first:
        assert _texts(first[name]) == _texts(again[name])
        assert first[name].column("row_id").to_pylist() == list(range(first[name].num_rows))
    assert set(_texts(first["validation"])) != set(_texts(other["validation"]))
    every = [t for name in first for t in _texts(first[name])]
    assert sorted(every) == sorted(f"row {i}" for i in range(200))


def test_given_splits_are_not_carved(tmp_path):
    train = write_jsonl([{"text": f"t{i}"} for i in range(30)], tmp_path / "t.jsonl")
    val = write_jsonl([{"text": f"v{i}"} for i in range(5)], tmp_path / "v.jsonl")
    tables = D.load_tables(
        make_recipe({"train": str(train), "validation": str(val), "split": {"test": 0.1}})
    )
    assert _texts(tables["validation"]) == [f"v{i}" for i in range(5)]
    assert tables["test"].num_rows == 3 and tables["train"].num_rows == 27
    no_val = D.load_tables(make_recipe({"train": str(train), "split": {"validation": 0.0}}))
    assert set(no_val) == {"train"} and no_val["train"].num_rows == 30


def test_balance_undersamples_train_to_equal_class_counts(tmp_path):
    rows = [{"text": f"p{i}", "label": "positive"} for i in range(60)]
    rows += [{"text": f"n{i}", "label": "negative"} for i in range(20)]
    path = write_jsonl(rows, tmp_path / "skewed.jsonl")
    data = {"train": str(path), "balance": True, "split": {"validation": 0.0}}
    tables = D.load_tables(make_recipe(data, task="classification"))
    assert Counter(tables["train"].column("label").to_pylist()) == {0: 20, 1: 20}
    assert len(set(_texts(tables["train"]))) == 40  # undersampled, never repeated
    unbalanced = D.load_tables(make_recipe({**data, "balance": False}, task="classification"))
    assert unbalanced["train"].num_rows == 80

    only_pos = write_jsonl(rows[:10], tmp_path / "pos.jsonl")
    with pytest.raises(DataError, match=r"label\(s\) negative have no training rows"):
        D.load_tables(make_recipe({**data, "train": str(only_pos)}, task="classification"))


def test_weighted_mix_follows_weights_and_keeps_source(tmp_path):
    a = write_jsonl([{"text": f"a{i}"} for i in range(300)], tmp_path / "a.jsonl")
    b = write_jsonl([{"text": f"b{i}"} for i in range(100)], tmp_path / "b.jsonl")
    recipe = make_recipe(
        {
            "train": [
                {"path": str(a), "weight": 1.0, "name": "alpha"},
                {"path": str(b), "weight": 3.0},
            ],
            "split": {"validation": 0.1},
        }
    )
    tables = D.load_tables(recipe)
    train = tables["train"]
    counts = Counter(train.column("source").to_pylist())
    assert counts == {"alpha": 90, "b": 270}  # 360 training rows, 1 : 3
    assert Counter(train.column("source_id").to_pylist()) == {0: 90, 1: 270}
    # The small source is repeated (3 full passes minus what validation took), the large one
    # subsampled; sources are interleaved, not one after the other.
    b_rows = [t for t in _texts(train) if t.startswith("b")]
    assert max(Counter(b_rows).values()) == 3
    first_half = train.column("source").to_pylist()[:180]
    assert 0.15 < first_half.count("alpha") / 180 < 0.35
    # Validation was carved per source before mixing: no validation row reaches train.
    assert not set(_texts(tables["validation"])) & set(_texts(train))
    assert set(tables["validation"].column("source").to_pylist()) == {"alpha", "b"}


def test_mix_proportions_within_tolerance():
    sizes, weights = (50, 500, 120), (0.2, 0.5, 0.3)
    tables = [pa.table({"src": [i] * n, "x": list(range(n))}) for i, n in enumerate(sizes)]
    mixed = D.mix(tables, weights, seed=1)
    total = sum(sizes)
    assert mixed.num_rows == total
    counts = Counter(mixed.column("src").to_pylist())
    for i, weight in enumerate(weights):
        assert abs(counts[i] - weight * total) <= 1
    # Subsampled without repeats where a source has more rows than its share.
    big = [
        x
        for s, x in zip(mixed.column("src").to_pylist(), mixed.column("x").to_pylist(), strict=True)
        if s == 1
    ]
    assert len(set(big)) == len(big)
    assert D.mix(tables, weights, seed=1).equals(mixed)


# ---------------------------------------------------------------------- tokenization


def _table(texts: list[str]) -> pa.Table:
    return pa.table({"text": texts, "row_id": list(range(len(texts)))})


def test_text_long_documents_are_chunked(gpt2_tok):
    text = " ".join(story_lines(20, seed=1))
    out = T.tokenize_text(_table([text, "short one."]), gpt2_tok, max_length=16)
    ids = out.column("input_ids").to_pylist()
    doc = gpt2_tok(text)["input_ids"] + [gpt2_tok.eos_token_id]
    n_chunks = -(-len(doc) // 16)
    assert [len(x) for x in ids[:n_chunks]] == [16] * (n_chunks - 1) + [
        len(doc) - 16 * (n_chunks - 1)
    ]
    assert [t for chunk in ids[:n_chunks] for t in chunk] == doc
    assert out.column("labels").to_pylist() == ids
    assert out.column("row_id").to_pylist()[: n_chunks + 1] == [
        *(i for i in range(n_chunks)),
        1 << T.PIECE_BITS,
    ]
    assert out.column("num_tokens").to_pylist() == [len(x) for x in ids]
    assert ids[-1][-1] == gpt2_tok.eos_token_id


def test_packing_fills_sequences_and_restarts_positions(gpt2_tok):
    texts = story_lines(30, seed=2)
    out = T.tokenize_packed(_table(texts), gpt2_tok, max_length=32).to_pylist()
    eos = gpt2_tok.eos_token_id
    assert all(r["num_tokens"] == 32 for r in out[:-1]) and out[-1]["num_tokens"] <= 32
    stream = [t for r in out for t in r["input_ids"]]
    assert stream == [t for x in texts for t in [*gpt2_tok(x)["input_ids"], eos]]
    for r in out:
        ids, pos, labels = r["input_ids"], r["position_ids"], r["labels"]
        for j in range(1, len(ids)):
            starts_example = ids[j - 1] == eos
            assert (pos[j] == 0) == starts_example
            assert (labels[j] == -100) == starts_example
            if not starts_example:
                assert pos[j] == pos[j - 1] + 1 and labels[j] == ids[j]
        assert pos[0] == 0
    assert len({r["row_id"] for r in out}) == len(out)


def test_packed_examples_do_not_see_each_other(gpt2_tok, tiny_gpt2):
    """With position_ids and no attention_mask, transformers masks each packed example apart:
    an example's logits inside a packed sequence equal its logits alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    texts = ["Ada walked to the harbour at dawn.", "Ben sang about the old mill at dawn."]
    packed = T.tokenize_packed(_table(texts), gpt2_tok, max_length=64)
    batch = make_collate(gpt2_tok.pad_token_id)(
        {k: packed.column(k).to_numpy(zero_copy_only=False) for k in packed.column_names}
    )
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(**model_inputs(batch)).logits[0]
        second = gpt2_tok(texts[1])["input_ids"] + [gpt2_tok.eos_token_id]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    start = len(gpt2_tok(texts[0])["input_ids"]) + 1
    torch.testing.assert_close(together[start : start + len(second)], alone, atol=1e-5, rtol=1e-4)


def test_instruction_rows_truncate_and_drop(gpt2_tok):
    table = pa.table(
        {
            "instruction": ["Say yes.", "Say no. " * 40],
            "input": ["", ""],
            "output": ["yes", "no"],
            "row_id": [0, 1],
        }
    )
    tokenized = T.tokenize_instruction(table, gpt2_tok, max_length=48, template=None)
    out = tokenized.to_pylist()
    assert [r["row_id"] for r in out] == [0]  # row 1's prompt alone fills max_length: dropped
    assert out[0]["input_ids"][-1] == gpt2_tok.eos_token_id == out[0]["labels"][-1]
    assert T.dropped_rows(tokenized) == {"too_long": 1}
    # Nor is a response cut to fit: it would lose its EOS, and teach the model not to stop.
    long_answer = table.set_column(2, "output", pa.array(["yes", "no " * 60]))
    long_answer = long_answer.set_column(0, "instruction", pa.array(["Say yes.", "Say no."]))
    tokenized = T.tokenize_instruction(long_answer, gpt2_tok, 48, None)
    assert [r["row_id"] for r in tokenized.to_pylist()] == [0]
    assert T.dropped_rows(tokenized) == {"too_long": 1}
    from launcher.job import describe_drops

    assert describe_drops({"too_long": 2}, 48, "instruction") == (
        "2 rows dropped (prompt, response and end-of-sequence token longer than data.max_length=48)"
    )
    prompt = T.render_prompt(None, "Say yes.", "")
    assert prompt == "### Instruction:\nSay yes.\n\n### Response:\n"
    assert T.render_prompt("Q: {instruction} {input} {other}", "a", "b") == "Q: a b {other}"
    assert T.render_prompt("{instruction}|{input}", "say {input}", "x") == "say {input}|x"
    assert (
        T.render_prompt(None, "I", "ctx")
        == "### Instruction:\nI\n\n### Input:\nctx\n\n### Response:\n"
    )


# ---------------------------------------------------------------- Ray pipeline end to end


def _rows(ds) -> list[dict]:
    return ds.take_all()


def read_shards_together(shards) -> list[list[int]]:
    """Row ids per shard; shards of a streaming split must be read at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    def read(shard) -> list[int]:
        return [int(x) for b in shard.iter_batches(batch_size=16) for x in b["row_id"]]

    with ThreadPoolExecutor(len(shards)) as pool:
        return list(pool.map(read, shards))


def first_batch(ds, batch_size: int, pad_token_id: int) -> dict:
    """The first collated batch, read as a training worker reads its shard."""
    batches = ds.iter_torch_batches(batch_size=batch_size, collate_fn=make_collate(pad_token_id))
    return next(iter(batches))


def test_instruction_labels_mask_exactly_the_prompt(ray_session, gpt2_tok, instruction_data):
    recipe = make_recipe(
        {
            "train": str(instruction_data["train"]),
            "validation": str(instruction_data["validation"]),
            "format": "instruction",
            "max_length": 128,
        }
    )
    prepared = prepare_data(recipe, gpt2_tok)
    raw = {
        i: r for i, r in enumerate(D.load_tables(recipe)["train"].to_pylist())
    }  # row_id -> raw row
    batch = first_batch(prepared.datasets["train"], 8, gpt2_tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "num_tokens", "row_id"}
    for i in range(8):
        row = raw[int(batch["row_id"][i])]
        prompt = gpt2_tok(T.render_prompt(None, row["instruction"], row["input"]))["input_ids"]
        n = int(batch["num_tokens"][i])
        labels = batch["labels"][i].tolist()
        ids = batch["input_ids"][i].tolist()
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [-100] * len(prompt)  # every prompt token ignored
        assert all(x != -100 for x in labels[len(prompt) : n])  # no response token ignored
        assert labels[len(prompt) : n] == ids[len(prompt) : n]
        assert gpt2_tok.decode(ids[len(prompt) : n]) == row["output"] + gpt2_tok.eos_token
        assert labels[n:] == [-100] * (len(labels) - n)  # padding ignored
        assert ids[n:] == [gpt2_tok.pad_token_id] * (len(ids) - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(ids) - n)


def test_classification_pipeline(ray_session, bert_tok, review_data, tiny_bert):
    recipe = make_recipe(
        {
            "train": str(review_data["train"]),
            "validation": str(review_data["validation"]),
            "test": str(review_data["test"]),
            "max_length": 12,
        },
        task="classification",
        model=tiny_bert,
    )
    prepared = prepare_data(recipe, bert_tok)
    assert prepared.num_rows == {"train": 320, "validation": 40, "test": 40}
    rows = sorted(_rows(prepared.datasets["validation"]), key=lambda r: r["row_id"])
    raw = [json.loads(line) for line in review_data["validation"].read_text().splitlines()]
    assert [r["labels"] for r in rows] == [LABELS.index(x["label"]) for x in raw]
    for r, x in zip(rows, raw, strict=True):
        expected = bert_tok(x["text"], truncation=True, max_length=12)["input_ids"]
        assert list(r["input_ids"]) == expected
        assert expected[0] == bert_tok.cls_token_id and len(expected) <= 12
    assert prepared.num_tokens["validation"] == sum(len(r["input_ids"]) for r in rows)
    batch = first_batch(prepared.datasets["validation"], 5, bert_tok.pad_token_id)
    assert batch["labels"].shape == (5,) and batch["labels"].dtype == torch.int64

    # Rows cut at max_length are counted (kept, not dropped) and said in ftlaunch's words.
    from launcher.job import describe_drops
    from launcher.summary import data_facts

    longer = sum(len(bert_tok(x["text"])["input_ids"]) > 12 for x in raw)
    assert longer > 0
    assert prepared.dropped["validation"] == {"truncated": longer}
    facts = data_facts(prepared)
    assert facts["truncated"]["validation"] == longer and "validation" not in facts["dropped"]
    assert describe_drops(prepared.dropped["validation"], 12).startswith(
        f"{longer:,} rows truncated to data.max_length=12 tokens"
    )


def test_truncated_rows_are_counted_alike_by_fast_and_slow_tokenizers(bert_tok, tmp_path):
    """A fast tokenizer's count comes from what it cut off (its encodings' overflow), a slow
    one's from tokenizing the rows at the limit again: both equal a direct count."""
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    by_id = sorted(bert_tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab.write_text("".join(f"{token}\n" for token, _ in by_id))
    slow = BertTokenizer(str(vocab))
    rows = review_rows(60, seed=4)
    table = pa.table(
        {
            "text": [r["text"] for r in rows],
            "label": [LABELS.index(r["label"]) for r in rows],
            "row_id": list(range(len(rows))),
        }
    )
    limit = 10
    longer = sum(len(bert_tok(r["text"])["input_ids"]) > limit for r in rows)
    exactly = sum(len(bert_tok(r["text"])["input_ids"]) == limit for r in rows)
    assert 0 < longer < len(rows) and exactly > 0  # rows at the limit are not counted
    for tokenizer in (bert_tok, slow):
        out = T.tokenize_classification(table, tokenizer, limit)
        dropped = json.loads(out.schema.metadata[T.DROPPED_KEY])
        assert dropped == {T.TRUNCATED: longer}, type(tokenizer).__name__
    assert T.tokenize_classification(table, bert_tok, limit).column("input_ids").to_pylist() == (
        T.tokenize_classification(table, slow, limit).column("input_ids").to_pylist()
    )


def test_tokenization_runs_once_and_shards_cover_the_data(ray_session, gpt2_tok, story_data):
    recipe = make_recipe(
        {
            "train": str(story_data["train"]),
            "validation": str(story_data["validation"]),
            "max_length": 32,
        }
    )
    prepared = prepare_data(recipe, gpt2_tok)
    runs = prepared.tokenization_runs()
    assert runs["train"]["rows_in"] == prepared.raw_rows["train"] == 260
    assert runs["train"]["rows_out"] == prepared.num_rows["train"]
    assert runs["train"]["calls"] >= 1
    # Two consumers (as two training workers would) read disjoint shards covering the split,
    # twice (two epochs), without a single new tokenization call.
    train = prepared.datasets["train"]
    for _epoch in range(2):
        seen = read_shards_together(train.streaming_split(2, equal=True))
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(r["row_id"] for r in _rows(train))
    assert prepared.tokenization_runs() == runs


def test_packed_mixed_sources_through_ray(ray_session, gpt2_tok, tmp_path):
    a = write_jsonl([{"text": t} for t in story_lines(80, seed=1)], tmp_path / "a.jsonl")
    b = write_jsonl([{"text": r["text"]} for r in review_rows(40, seed=2)], tmp_path / "b.jsonl")
    recipe = make_recipe(
        {
            "train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}],
            "max_length": 64,
            "packing": True,
            "split": {"validation": 0.0},
        }
    )
    prepared = prepare_data(recipe, gpt2_tok)
    assert prepared.sources == ["a", "b"]
    rows = _rows(prepared.datasets["train"])
    assert {r["source"] for r in rows} == {"a", "b"}
    full = sum(1 for r in rows if r["num_tokens"] == 64)
    assert full >= len(rows) - prepared.tokenization_runs()["train"]["calls"]
    batch = first_batch(prepared.datasets["train"], 4, gpt2_tok.pad_token_id)
    assert set(batch) == {
        "input_ids",
        "labels",
        "position_ids",
        "num_tokens",
        "row_id",
        "source_id",
    }


def test_tokenizing_in_the_driver_gives_what_the_ray_data_tasks_give(
    ray_session, gpt2_tok, tmp_path, monkeypatch
):
    """Small splits are tokenized in the driver: the same rows, in the same order, the same
    counts (packing included, which depends on where batches begin)."""
    lines = story_lines(700, seed=4)  # 630 train rows: two blocks, four tokenizing batches
    path = write_jsonl([{"text": t} for t in lines], tmp_path / "s.jsonl")
    recipe = make_recipe({"train": str(path), "max_length": 48, "packing": True})
    prepared = {}
    for where in ("1", "0"):
        monkeypatch.setenv("FTLAUNCH_IN_PROCESS", where)
        prepared[where] = prepare_data(recipe, gpt2_tok)
    here, tasks = prepared["1"], prepared["0"]
    assert (here.num_rows, here.num_tokens) == (tasks.num_rows, tasks.num_tokens)

    assert here.tokenization_runs() == tasks.tokenization_runs()
    assert here.tokenization_runs()["train"]["calls"] == 4  # two blocks of 315: 256 + 59 each
    for split in here.datasets:
        assert _rows(here.datasets[split]) == _rows(tasks.datasets[split])


def test_no_examples_left_is_a_data_error(ray_session, gpt2_tok, tmp_path):
    path = write_jsonl(instruction_rows(6, seed=1), tmp_path / "i.jsonl")
    recipe = make_recipe(
        {"train": str(path), "format": "instruction", "max_length": 8, "split": {"validation": 0}}
    )
    with pytest.raises(DataError, match=r"data.train: no examples left after tokenization"):
        prepare_data(recipe, gpt2_tok)


def test_no_examples_left_names_the_rule_of_the_format():
    """The driver path and the streamed tasks raise the same error, with each format's rule."""
    said = {f: str(T.no_examples_left("train", 6, f, 8)) for f in ("instruction", "chat", "text")}
    assert said["instruction"] == (
        "data.train: no examples left after tokenization (6 rows in; instruction rows whose "
        "response does not fit data.max_length=8 are dropped)"
    )
    assert "chat rows whose first trained assistant turn does not fit" in said["chat"]
    assert "(6 rows in; rows that do not fit data.max_length=8 are dropped)" in said["text"]


# ------------------------------------------------------------------------------ collate


def test_collate_pads_each_field_with_its_own_value():
    collate = make_collate(pad_token_id=7)
    batch = {
        "input_ids": np.array([np.array([1, 2, 3]), np.array([4])], dtype=object),
        "attention_mask": np.array([np.array([1, 1, 1]), np.array([1])], dtype=object),
        "labels": np.array([np.array([-100, 2, 3]), np.array([4])], dtype=object),
        "num_tokens": np.array([3, 1]),
        "row_id": np.array([10, 11]),
    }
    out = collate(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["row_id"].tolist() == [10, 11]
    assert all(t.dtype == torch.int64 for t in out.values())

    packed = collate(
        {
            "input_ids": np.array([[5, 6], [8, 9]]),  # equal lengths arrive as a 2-D array
            "attention_mask": np.array([[1, 1], [1, 1]]),
            "labels": np.array([[5, 6], [8, 9]]),
            "position_ids": np.array([np.array([0, 1, 0]), np.array([0])], dtype=object),
        }
    )
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
    classification = collate(
        {
            "input_ids": np.array([np.array([1]), np.array([2, 3])], dtype=object),
            "labels": np.array([1, 0]),
        }
    )
    assert classification["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs a pad token id"):
        make_collate(None)
