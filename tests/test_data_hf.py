"""launcher.hf_files: large `hf:` splits read by Ray Data tasks from their `datasets` cache files.

The hub is not reachable here, so the dataset is a local folder that `datasets` loads as it
loads a hub dataset: Parquet data files and a README whose metadata declares a ClassLabel
column, prepared once into Arrow cache files under a test-local HF_DATASETS_CACHE."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from launcher import hf_files as H
from launcher import prepared as P
from launcher import stream_data as S
from launcher.cli import cli
from launcher.data import fields_for, read_source
from launcher.dev.synthetic import review_rows
from launcher.recipe import validate_data
from tests.helpers import write_recipe

LABELS = ["negative", "positive"]
CARD = """---
dataset_info:
  features:
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': negative
          '1': positive
configs:
- config_name: default
  data_files:
  - split: train
    path: train-*.parquet
---
"""


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def write_hub_folder(root: Path, rows: list[dict], card: bool = True) -> str:
    """A dataset folder `datasets` loads like a hub dataset; returns its hf: spec. Without the
    card the labels stay plain integers."""
    root.mkdir(parents=True, exist_ok=True)
    if card:
        (root / "README.md").write_text(CARD)
    ids = {name: i for i, name in enumerate(LABELS)}
    table = pa.table(
        {
            "sentence": [r["text"] for r in rows],
            "label": pa.array([ids.get(r["label"], -1) for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, root / "train-00000.parquet")
    return f"hf:{root}:train"


def hub_recipe(tmp_path: Path, model: Path, spec: str, **data):
    return validate_data(
        {
            "name": "hub",
            "model": {"name_or_path": str(model), "task": "classification", "labels": LABELS},
            "data": {
                "train": spec,
                "format": "classification",
                "text_field": "sentence",
                "max_length": 32,
                "cache_dir": str(tmp_path / "cache"),
                **data,
            },
            "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
        }
    )


def test_a_large_hub_split_is_read_piece_by_piece_from_its_cache_files(
    tmp_path, tiny_gpt2, hf_cache, monkeypatch
):
    """Above the threshold each cache file is a piece; its rows, labels named from the
    ClassLabel feature, are the rows the driver path reads, in the same order."""
    rows = review_rows(2500, seed=4)
    spec = write_hub_folder(tmp_path / "reviews", rows)
    recipe = hub_recipe(tmp_path, tiny_gpt2, spec)
    assert S.stream_plan(recipe) is None  # 2,500 short rows: the driver path reads them

    monkeypatch.setenv(S.STREAM_BYTES_ENV, "0")
    monkeypatch.setattr(S, "PARQUET_BATCH_ROWS", 700)  # several tables per file
    plan = S.stream_plan(recipe)
    files = H.resolve_split(spec).files
    assert plan is not None and files and str(hf_cache) in files[0].path
    assert [(p.kind, p.path) for p in plan.pieces] == [("arrow", f.path) for f in files]
    assert plan.total_bytes == sum(f.size for f in files)

    fields = S.reading_settings(plan, recipe).fields
    tables = [t for piece in plan.pieces for t, _ in S.piece_tables(piece, fields)]
    assert len(tables) > 2
    streamed = pa.concat_tables(tables)
    driver = read_source(spec, fields_for(recipe)).table
    assert streamed.to_pylist() == driver.to_pylist()
    assert streamed.column("label").to_pylist()[:4] == [LABELS.index(r["label"]) for r in rows[:4]]


def test_a_run_loads_a_small_hub_split_once(tmp_path, tiny_gpt2, hf_cache, monkeypatch):
    """The cache lookup (fingerprint, plan) and the driver path's read share one load of the
    split: loading a hub dataset again may ask the hub again."""
    from launcher import records
    from launcher.job import open_data

    rows = review_rows(300, seed=6)
    spec = write_hub_folder(tmp_path / "reviews", rows)
    recipe = hub_recipe(tmp_path, tiny_gpt2, spec)
    loads = []

    def load_counted(name, load=records.load_hf_split):
        loads.append(name)
        return load(name)

    monkeypatch.setattr(H, "load_hf_split", load_counted)
    monkeypatch.setattr(records, "load_hf_split", load_counted)
    _, slot, tables = open_data(recipe)
    assert loads == [spec] and not slot.hit
    read = [r for table in tables.values() for r in table.select(["text", "label"]).to_pylist()]
    named = [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows]
    assert sorted(read, key=str) == sorted(named, key=str)


def test_a_bad_row_of_a_hub_split_names_its_cache_file_and_row(
    tmp_path, tiny_gpt2, hf_cache, monkeypatch
):
    rows = review_rows(3000, seed=5)
    rows[2345]["label"] = "unlabelled"  # stored as ClassLabel's -1: no label
    spec = write_hub_folder(tmp_path / "reviews", rows)
    monkeypatch.setenv(S.STREAM_BYTES_ENV, "0")
    recipe = hub_recipe(tmp_path, tiny_gpt2, spec)
    plan = S.stream_plan(recipe)
    fields = S.reading_settings(plan, recipe).fields
    (piece,) = plan.pieces
    with pytest.raises(S.DataError, match=f"^{piece.path}: row 2346: missing field 'label'"):
        list(S.piece_tables(piece, fields))


def test_a_hub_split_that_cannot_be_loaded_is_bad_input_before_anything_starts(
    tmp_path, tiny_gpt2, hf_cache
):
    spec = f"hf:{tmp_path / 'no-such-dataset'}:train"
    body = {
        "name": "hub",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": spec, "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
    }
    out = CliRunner().invoke(cli, ["prepare", str(write_recipe(tmp_path, body))])
    assert out.exit_code == 2, out.output
    assert f"{spec}: cannot load Hugging Face dataset" in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_changed_hub_split_is_a_new_cache_entry(tmp_path, tiny_gpt2, hf_cache, monkeypatch):
    import datasets

    from launcher.models import load_tokenizer

    # `datasets` prepares new cache files for changed data files only online and when no card
    # names them (otherwise it serves the first ones); a local folder needs no network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    root = tmp_path / "reviews"
    spec = write_hub_folder(root, review_rows(200, seed=6), card=False)
    recipe = hub_recipe(tmp_path, tiny_gpt2, spec)
    tokenizer = load_tokenizer(recipe.model)
    key, inputs = P.fingerprint(recipe, tokenizer)
    (state,) = inputs["sources"]["train"]
    assert [f[0] for f in state["files"]] == [f.path for f in H.resolve_split(spec).files]
    assert P.fingerprint(recipe, tokenizer)[0] == key
    write_hub_folder(root, review_rows(201, seed=6), card=False)
    assert P.fingerprint(recipe, tokenizer)[0] != key


@pytest.mark.ray_job
def test_prepare_streams_a_hub_split_and_a_second_prepare_reuses_it(
    ray_session, tmp_path, tiny_gpt2, hf_cache, monkeypatch
):
    """`ftlaunch prepare` on a large hub split: tasks read its cache files and write the entry
    (the driver reads no rows); the rows and tokens are those of the driver path."""
    spec = write_hub_folder(tmp_path / "reviews", review_rows(600, seed=7))
    body = {
        "name": "hub",
        "model": {"name_or_path": str(tiny_gpt2), "task": "classification", "labels": LABELS},
        "data": {
            "train": spec,
            "format": "classification",
            "text_field": "sentence",
            "max_length": 32,
            "split": {"validation": 0.0, "test": 0.0},
            "cache_dir": str(tmp_path / "cache"),
        },
        "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
    }
    path = write_recipe(tmp_path, body)
    monkeypatch.setenv(S.STREAM_BYTES_ENV, "0")
    first = CliRunner().invoke(cli, ["prepare", str(path)])
    assert first.exit_code == 0, first.output
    assert "written" in first.output
    (entry,) = (tmp_path / "cache").glob("*/prepared.json")
    meta = json.loads(entry.read_text())
    assert meta["inputs"]["prepared_by"] == "tasks"
    assert meta["splits"]["train"]["rows"] == meta["splits"]["train"]["raw_rows"] == 600
    again = CliRunner().invoke(cli, ["prepare", str(path)])
    assert again.exit_code == 0 and "reused" in again.output, again.output

    from launcher.models import load_tokenizer

    recipe = hub_recipe(tmp_path, tiny_gpt2, spec, split={"validation": 0.0, "test": 0.0})
    tokenizer = load_tokenizer(recipe.model)
    streamed = P.read_entry(P.lookup(recipe, tokenizer)).datasets["train"]
    monkeypatch.delenv(S.STREAM_BYTES_ENV)
    driver = P.load_or_prepare(P.lookup(recipe, tokenizer), recipe, tokenizer)
    assert driver.cache["path"] != str(entry.parent)  # the driver path's own entry

    def examples(ds) -> list:
        rows = ds.select_columns(["input_ids", "labels"]).take_all()
        return sorted((list(r["input_ids"]), int(r["labels"])) for r in rows)

    assert examples(streamed) == examples(driver.datasets["train"])
