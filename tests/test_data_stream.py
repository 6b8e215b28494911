"""launcher.stream_data: large sources prepared by Ray Data tasks straight into the cache.

The threshold is forced down (FTLAUNCH_STREAM_BYTES=0) so small generated files take the
streamed path; pieces are cut small so a file spans several tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from launcher import prepared as P
from launcher import stream_data as S
from launcher.cli import cli
from launcher.data import SPLITS
from launcher.dev.synthetic import review_rows, story_lines, write_jsonl
from launcher.recipe import load_recipe, validate_data
from tests.helpers import write_recipe
from tests.test_data_shards import assert_disjoint_and_covering, row_ids, write_story_files


@pytest.fixture
def streamed(monkeypatch):
    monkeypatch.setenv(S.STREAM_BYTES_ENV, "0")
    monkeypatch.setattr(S, "PIECE_BYTES", 2048)


def text_recipe(tmp_path: Path, model: Path, train: str, **data):
    return validate_data(
        {
            "name": "stream",
            "model": {"name_or_path": str(model)},
            "data": {
                "train": train,
                "max_length": 32,
                "cache_dir": str(tmp_path / "cache"),
                **data,
            },
            "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
        }
    )


def assigned_keys(plan: S.StreamPlan, recipe) -> dict[str, set]:
    """(file, locator) of every row per split, computed piece by piece as the tasks do."""
    settings = S.reading_settings(plan, recipe)
    keys: dict[str, set] = {name: set() for name in SPLITS}
    for piece in plan.pieces:
        for table, locators in S.piece_tables(piece, settings.fields):
            assert table.num_rows == len(locators)
            for k, loc in zip(S._assign(piece, locators, settings), locators, strict=True):
                keys[SPLITS[k]].add((piece.rel, int(loc)))
    return keys


def test_pieces_cut_at_lines_and_splits_do_not_depend_on_the_cut(tmp_path, tiny_gpt2, streamed):
    spec = write_story_files(tmp_path / "data", "jsonl-glob", lines=600)
    recipe = text_recipe(tmp_path, tiny_gpt2, spec, split={"validation": 0.2, "test": 0.1})
    plan = S.stream_plan(recipe)
    assert plan is not None and len(plan.pieces) > 3  # files cut into several byte ranges
    keys = assigned_keys(plan, recipe)
    assert sum(len(v) for v in keys.values()) == 600  # every line read exactly once
    assert not keys["train"] & keys["validation"] and not keys["validation"] & keys["test"]
    assert not keys["train"] & keys["test"]
    assert 0.1 < len(keys["validation"]) / 600 < 0.3 and 0.03 < len(keys["test"]) / 600 < 0.17

    # The batch stage evaluates on the very rows the tasks carved (read here, piece by piece).
    evaluated = S.split_rows(plan, recipe, "test")
    assert evaluated.num_rows == len(keys["test"]) == len(set(evaluated["row_id"].to_pylist()))

    S.PIECE_BYTES = 10**9  # one piece per file: the same rows land in the same splits
    whole = S.stream_plan(recipe)
    assert len(whole.pieces) == 3
    assert assigned_keys(whole, recipe) == keys
    reseeded = text_recipe(tmp_path, tiny_gpt2, spec, split={"validation": 0.2, "seed": 1})
    assert assigned_keys(S.stream_plan(reseeded), reseeded)["validation"] != keys["validation"]


def test_evaluation_rows_of_a_parquet_file_read_in_batches_keep_unique_ids(
    tmp_path, tiny_gpt2, streamed, monkeypatch
):
    """The batch stage's rows of a carved split: a Parquet file comes in several batches, and
    the row ids stay unique across them."""
    monkeypatch.setattr(S, "PARQUET_BATCH_ROWS", 50)
    spec = write_story_files(tmp_path / "data", "parquet-dir")
    recipe = text_recipe(tmp_path, tiny_gpt2, spec, split={"test": 0.3})
    plan = S.stream_plan(recipe)
    evaluated = S.split_rows(plan, recipe, "test")
    ids = evaluated["row_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(assigned_keys(plan, recipe)["test"]) > 50


def test_an_unreadable_file_is_bad_data_named_by_its_path(tmp_path, tiny_gpt2, streamed):
    (tmp_path / "data").mkdir()
    broken = tmp_path / "data" / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    recipe = text_recipe(tmp_path, tiny_gpt2, str(broken))
    plan = S.stream_plan(recipe)
    settings = S.reading_settings(plan, recipe)
    with pytest.raises(S.DataError, match=f"^{broken}: cannot read file: "):
        list(S.piece_tables(plan.pieces[0], settings.fields))


def test_small_sources_stay_on_the_driver(tmp_path, tiny_gpt2, monkeypatch):
    spec = write_story_files(tmp_path / "data", "jsonl-glob")
    assert S.stream_plan(text_recipe(tmp_path, tiny_gpt2, spec)) is None  # below 16 MiB
    monkeypatch.setenv(S.STREAM_BYTES_ENV, "0")
    assert S.stream_plan(text_recipe(tmp_path, tiny_gpt2, spec)) is not None


@pytest.mark.ray_job
def test_a_bad_row_deep_in_a_large_file_exits_2_and_leaves_no_entry(
    ray_session, tiny_gpt2, tmp_path, streamed, monkeypatch
):
    monkeypatch.setattr(S, "PIECE_BYTES", 256 * 1024)
    rows = [{"text": f"row {i} " + "word " * 12} for i in range(20_000)]
    rows[17_321] = {"body": "no text field here"}
    path = write_jsonl(rows, tmp_path / "big.jsonl")
    assert path.stat().st_size > 4 * S.PIECE_BYTES  # the bad row is pieces away from the start
    body = {
        "name": "bad",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": str(path), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
    }
    out = CliRunner().invoke(cli, ["prepare", str(write_recipe(tmp_path, body))])
    assert out.exit_code == 2, out.output
    assert f"{path}: line 17322: missing field 'text'" in out.output
    assert "Traceback" not in out.output
    cache = tmp_path / "cache"
    # No entry; a task still writing as the driver gave up may at most delay the removal of
    # the temporary directory, which no lookup reads.
    assert not list(cache.glob("*/prepared.json")) and not list(cache.glob("[!.]*"))


@pytest.mark.ray_job
def test_streamed_entry_is_deterministic_and_mixes_and_balances(
    ray_session, tiny_gpt2, tmp_path, streamed
):
    """Two sources mixed 3:1 with balanced classes, prepared twice into two caches: the same
    rows; the mix and the class counts follow the weights and balance in expectation."""
    from launcher.models import load_tokenizer

    S.PIECE_BYTES = 16 * 1024  # several pieces a source, not dozens of one-task pieces

    root = tmp_path / "data"
    root.mkdir()
    a = write_jsonl(review_rows(600, seed=1), root / "a.jsonl")
    b = write_jsonl(review_rows(300, seed=2), root / "b.jsonl")

    def recipe_in(cache: Path):
        return validate_data(
            {
                "name": "mix",
                "model": {
                    "name_or_path": str(tiny_gpt2),
                    "task": "classification",
                    "labels": ["negative", "positive"],
                },
                "data": {
                    "train": [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}],
                    "format": "classification",
                    "max_length": 32,
                    "balance": True,
                    "split": {"validation": 0.1},
                    "cache_dir": str(cache),
                },
                "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
            }
        )

    recipe = recipe_in(tmp_path / "c1")
    tokenizer = load_tokenizer(recipe.model)
    first = P.load_or_prepare(P.lookup(recipe, tokenizer), recipe, tokenizer)
    assert first.cache["reused"] is False
    meta = P.read_meta(Path(first.cache["path"]))
    assert meta["inputs"]["prepared_by"] == "tasks"
    assert first.tokenization_runs()["train"]["rows_in"] == first.raw_rows["train"]
    again = recipe_in(tmp_path / "c2")
    second = P.load_or_prepare(P.lookup(again, tokenizer), again, tokenizer)
    for split in ("train", "validation"):
        cols = ["row_id", "input_ids", "labels", "source_id"]
        one, two = (
            d.datasets[split].select_columns(cols).to_pandas().sort_values("row_id")
            for d in (first, second)
        )
        assert len(one) == len(two)
        assert one.reset_index(drop=True).to_json() == two.reset_index(drop=True).to_json()

    train = first.datasets["train"].select_columns(["labels", "source_id"]).to_pandas()
    share_b = float(np.mean(train["source_id"] == first.sources.index("b")))
    assert 0.65 < share_b < 0.85  # weight 3 of 4
    counts = np.bincount(train["labels"].to_numpy(), minlength=2)
    assert abs(counts[0] - counts[1]) < 0.2 * counts.sum()
    assert len(set(row_ids(first.datasets["train"]))) == first.num_rows["train"]


@pytest.mark.ray_job
def test_a_streamed_recipe_trains(ray_session, tiny_gpt2, tmp_path, streamed):
    """`ftlaunch submit` of a recipe whose sources take the streamed path. One worker, in this
    process: an entry this small is read into memory like any other, and streamed entries
    reaching two Ray Train workers is the next test's."""
    from launcher.job import run

    spec = write_story_files(tmp_path / "data", "jsonl-glob")
    body = {
        "name": "streamed",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": spec, "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4},
        "scaling": {"num_workers": 1},
        "checkpoint": {"storage_path": str(tmp_path / "runs")},
    }
    summary = run(load_recipe(write_recipe(tmp_path, body)))
    assert summary["status"] == "succeeded" and summary["steps"] == 2
    facts = summary["data"]
    assert facts["prepared"]["reused"] is False
    meta = json.loads((Path(facts["prepared"]["path"]) / P.META_FILE).read_text())
    assert meta["inputs"]["prepared_by"] == "tasks"
    assert facts["rows"] == {k: v["rows"] for k, v in meta["splits"].items()}


@pytest.mark.ray_job
@pytest.mark.timeout(600)  # a hang fails here instead of stalling the suite
def test_a_large_entry_streams_to_workers_that_hold_every_cpu(
    ray_session, tiny_gpt2, tmp_path, streamed, monkeypatch
):
    """A directory of Parquet files prepared by tasks into an entry above READ_HERE_BYTES: the
    entry is not materialized, its read tasks reserve no CPU, so two workers holding all of
    Ray's CPUs still get disjoint shards covering each epoch (the 2-core hang)."""
    import ray
    import ray.train
    from ray.data.dataset import MaterializedDataset
    from ray.train.torch import TorchTrainer

    from launcher.models import load_tokenizer
    from tests.test_data_shards import Collector, read_shards

    monkeypatch.setattr(P, "READ_HERE_BYTES", 0)
    recipe = text_recipe(tmp_path, tiny_gpt2, write_story_files(tmp_path / "data", "parquet-dir"))
    tokenizer = load_tokenizer(recipe.model)
    data = P.load_or_prepare(P.lookup(recipe, tokenizer), recipe, tokenizer)
    assert data.raw_rows["train"] + data.raw_rows["validation"] == 240
    slot = P.lookup(recipe, tokenizer)
    assert slot.hit
    train = P.read_entry(slot).datasets["train"]
    assert not isinstance(train, MaterializedDataset)  # streamed, not held in the object store

    cpus = int(ray.cluster_resources()["CPU"])
    collector = ray.remote(num_cpus=0)(Collector).remote()
    TorchTrainer(
        read_shards,
        train_loop_config={"collector": collector, "names": ["train"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": cpus / 2}
        ),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="held"),
        datasets={"train": train},
    ).fit()
    all_ids = row_ids(train)
    assert len(all_ids) == data.num_rows["train"] == len(set(all_ids))
    assert_disjoint_and_covering(ray.get(collector.get.remote())["train"], all_ids)


def test_s3_sources_are_listed_and_read_by_piece(s3_server, tiny_gpt2, tmp_path, monkeypatch):
    """s3:// sources always take the streamed path (the driver path reads local files only);
    the tasks' readers cut and read them through pyarrow's filesystems."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launcher.models import load_tokenizer

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(S, "PIECE_BYTES", 1024)
    fs = s3_server.filesystem()
    texts = story_lines(90, seed=7)
    root = f"{s3_server.bucket}/stream-{tmp_path.name}"
    with fs.open_output_stream(f"{root}/a.jsonl") as out:
        out.write("".join(json.dumps({"text": t}) + "\n" for t in texts[:60]).encode())
    with fs.open_output_stream(f"{root}/b.parquet") as out:
        pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts[60:]]), out)
    with fs.open_output_stream(f"{root}/c.csv") as out:
        out.write(b"text\nfirst\nsecond\n")
    recipe = text_recipe(tmp_path, tiny_gpt2, f"s3://{root}")
    # Only the tasks read a remote source: its listing error is the one to show, at once.
    missing = text_recipe(tmp_path, tiny_gpt2, f"s3://{root}-missing/")
    with pytest.raises(S.DataError, match=f"s3://{root}-missing/: no data files found"):
        P.fingerprint(missing, load_tokenizer(missing.model))
    plan = S.stream_plan(recipe)
    assert plan is not None and plan.total_bytes < S.stream_bytes()
    assert {p.kind for p in plan.pieces} == {"lines", "parquet", "whole"}
    keys = assigned_keys(plan, recipe)
    assert sum(len(v) for v in keys.values()) == 92
    assert {rel for rel, _ in keys["train"]} == {"a.jsonl", "b.parquet", "c.csv"}
