"""Two Ray Train workers read disjoint shards that together cover each epoch; tokenization ran
once, in Ray Data, not in the workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import yaml

from launcher.recipe import load_recipe

# The workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Collector:
    """Row ids seen by each (rank, epoch)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], list[int]] = {}

    def add(self, rank: int, epoch: int, ids: list[int]) -> None:
        self.seen.setdefault((rank, epoch), []).extend(ids)

    def get(self) -> dict[tuple[int, int], list[int]]:
        return self.seen


def read_shard(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        ids: list[int] = []
        for batch in shard.iter_batches(
            batch_size=16, local_shuffle_buffer_size=32, local_shuffle_seed=epoch
        ):
            ids.extend(int(i) for i in batch["row_id"])
        ray.get(config["collector"].add.remote(rank, epoch, ids))


def row_ids(dataset) -> list[int]:
    return sorted(int(r["row_id"]) for r in dataset.select_columns(["row_id"]).take_all())


def shards_seen(dataset, storage: Path) -> dict[tuple[int, int], list[int]]:
    """Row ids each of two real Ray Train workers reads from its shard, per (rank, epoch)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    collector = ray.remote(num_cpus=0)(Collector).remote()
    TorchTrainer(
        read_shard,
        train_loop_config={"collector": collector},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(storage), name="shards"),
        datasets={"train": dataset},
    ).fit()
    return ray.get(collector.get.remote())


def assert_disjoint_and_covering(seen: dict, all_ids: list[int]) -> None:
    for epoch in range(2):
        a, b = seen[(0, epoch)], seen[(1, epoch)]
        assert not set(a) & set(b), "the two workers' shards overlap"
        covered = set(a) | set(b)
        assert len(covered) == len(a) + len(b)  # no row twice within a shard
        # Equal shards may leave out fewer rows than there are workers.
        assert covered <= set(all_ids) and len(all_ids) - len(covered) < 2


@pytest.mark.ray_job
def test_worker_shards_are_disjoint_cover_the_epoch_and_tokenize_once(
    ray_session, tiny_gpt2, story_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("FTLAUNCH_IN_PROCESS", "0")  # tokenized in Ray Data tasks, not the driver

    from launcher.data import prepare_data
    from launcher.models import load_tokenizer

    path = tmp_path / "recipe.yaml"
    body = {
        "name": "shards",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": str(story_data["train"]), "max_length": 32},
        "checkpoint": {"metric": None},
    }
    path.write_text(yaml.safe_dump(body))
    recipe = load_recipe(path)
    data = prepare_data(recipe, load_tokenizer(recipe.model))
    before = data.tokenization_runs()
    all_ids = row_ids(data.datasets["train"])

    seen = shards_seen(data.datasets["train"], tmp_path / "runs")
    assert_disjoint_and_covering(seen, all_ids)
    for epoch in range(2):
        assert len(seen[(0, epoch)]) == len(seen[(1, epoch)])  # DDP steps stay in lockstep
    assert seen[(0, 0)] != seen[(0, 1)]  # reshuffled per epoch

    after = data.tokenization_runs()
    assert after == before  # the workers read finished blocks; nothing was tokenized again
    assert after["train"]["rows_in"] == data.raw_rows["train"]  # every raw row tokenized once


def write_story_files(root: Path, kind: str, parts: int = 3, lines: int = 240) -> str:
    """Story lines split over several files: a directory of Parquet files, or JSON Lines files
    named by a glob. Returns the data.train spec."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launcher.dev.synthetic import story_lines, write_jsonl

    texts = story_lines(lines, seed=6)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(parts):
        rows = [{"text": t} for t in texts[i::parts]]
        if kind == "parquet-dir":
            pq.write_table(pa.Table.from_pylist(rows), root / f"part-{i}.parquet")
        else:
            write_jsonl(rows, root / f"shard-{i}.jsonl")
    (root / "notes.md").write_text("not data")  # skipped by the directory, unmatched by the glob
    return str(root) if kind == "parquet-dir" else str(root / "shard-*.jsonl")


@pytest.mark.ray_job
@pytest.mark.parametrize("kind", ["parquet-dir", "jsonl-glob"])
def test_multi_file_sources_shard_from_the_prepared_cache(ray_session, tiny_gpt2, tmp_path, kind):
    """A directory of Parquet files and a JSON Lines glob, prepared into the cache, then read back
    from it (as a later run does): every row once; the two workers' shards of the read-back
    entry are disjoint and cover each epoch."""

    from launcher import prepared as P
    from launcher.models import load_tokenizer

    spec = write_story_files(tmp_path / "data", kind)
    body = {
        "name": "files",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": spec, "max_length": 32, "cache_dir": str(tmp_path / "cache")},
        "checkpoint": {"metric": None, "storage_path": str(tmp_path / "runs")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.model)
    first = P.load_or_prepare(P.lookup(recipe, tokenizer), recipe, tokenizer)
    slot = P.lookup(recipe, tokenizer)
    assert slot.hit
    data = P.load_or_prepare(slot, recipe, tokenizer)
    assert data.tokenization_runs() == {}
    assert data.raw_rows["train"] + data.raw_rows["validation"] == 240
    all_ids = row_ids(data.datasets["train"])
    assert len(all_ids) == first.num_rows["train"] == len(set(all_ids))

    if kind == "jsonl-glob":  # an entry is Parquet whatever its sources: one sharding run
        assert_disjoint_and_covering(shards_seen(data.datasets["train"], tmp_path / "ray"), all_ids)
