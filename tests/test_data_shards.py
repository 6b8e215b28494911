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
    """Row ids seen by each (rank, epoch), per dataset."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[tuple[int, int], list[int]]] = {}

    def add(self, name: str, rank: int, epoch: int, ids: list[int]) -> None:
        self.seen.setdefault(name, {}).setdefault((rank, epoch), []).extend(ids)

    def get(self) -> dict[str, dict[tuple[int, int], list[int]]]:
        return self.seen


def read_shards(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    for name in config["names"]:
        shard = ray.train.get_dataset_shard(name)
        for epoch in range(2):
            ids: list[int] = []
            for batch in shard.iter_batches(
                batch_size=16, local_shuffle_buffer_size=32, local_shuffle_seed=epoch
            ):
                ids.extend(int(i) for i in batch["row_id"])
            ray.get(config["collector"].add.remote(name, rank, epoch, ids))


def row_ids(dataset) -> list[int]:
    return sorted(int(r["row_id"]) for r in dataset.select_columns(["row_id"]).take_all())


def shards_seen(datasets: dict, storage: Path) -> dict[str, dict[tuple[int, int], list[int]]]:
    """Row ids each of two real Ray Train workers reads from its shard of each dataset, per
    (rank, epoch): one run for all of them (a worker group start is the slow part)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    collector = ray.remote(num_cpus=0)(Collector).remote()
    TorchTrainer(
        read_shards,
        train_loop_config={"collector": collector, "names": sorted(datasets)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(storage), name="shards"),
        datasets=datasets,
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
    """A freshly tokenized entry and a multi-file one read back from the cache (an entry is
    Parquet whatever its sources): the two workers' shards of each are disjoint, cover each
    epoch and are reshuffled per epoch; nothing is tokenized again in the workers."""
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
    _, cached = read_back_entry(tmp_path / "files", tiny_gpt2, "jsonl-glob")
    entries = {"fresh": data.datasets["train"], "cached": cached.datasets["train"]}

    seen = shards_seen(entries, tmp_path / "runs")
    for name, dataset in entries.items():
        assert_disjoint_and_covering(seen[name], row_ids(dataset))
    fresh = seen["fresh"]
    for epoch in range(2):
        assert len(fresh[(0, epoch)]) == len(fresh[(1, epoch)])  # DDP steps stay in lockstep
    assert fresh[(0, 0)] != fresh[(0, 1)]  # reshuffled per epoch

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


def read_back_entry(root: Path, model: Path, kind: str):
    """Story files of `kind` prepared into a cache under `root`, then read back from it as a
    later run does: (the first run's data, the read-back data)."""
    from launcher import prepared as P
    from launcher.models import load_tokenizer

    spec = write_story_files(root / "data", kind)
    body = {
        "name": "files",
        "model": {"name_or_path": str(model)},
        "data": {"train": spec, "max_length": 32, "cache_dir": str(root / "cache")},
        "checkpoint": {"metric": None, "storage_path": str(root / "runs")},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.model)
    first = P.load_or_prepare(P.lookup(recipe, tokenizer), recipe, tokenizer)
    slot = P.lookup(recipe, tokenizer)
    assert slot.hit
    return first, P.load_or_prepare(slot, recipe, tokenizer)


@pytest.mark.parametrize("kind", ["parquet-dir", "jsonl-glob"])
def test_multi_file_sources_are_read_back_from_the_prepared_cache(
    ray_session, tiny_gpt2, tmp_path, kind
):
    """A directory of Parquet files and a JSON Lines glob, prepared into the cache, then read back
    from it (as a later run does): every row once, nothing tokenized again. Two workers' shards
    of such an entry: test_worker_shards_are_disjoint_cover_the_epoch_and_tokenize_once."""
    first, data = read_back_entry(tmp_path, tiny_gpt2, kind)
    assert data.tokenization_runs() == {}
    assert data.raw_rows["train"] + data.raw_rows["validation"] == 240
    all_ids = row_ids(data.datasets["train"])
    assert len(all_ids) == first.num_rows["train"] == len(set(all_ids))
