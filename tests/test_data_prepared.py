"""launcher.prepared: the prepared-dataset cache (fingerprint, atomic entries, hits and misses)
and `ftlaunch prepare` followed by a submit that tokenizes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher import prepared as P
from launcher.cli import cli
from launcher.dev.synthetic import story_lines, write_jsonl
from launcher.progress import ProgressView
from launcher.recipe import load_recipe, validate_data
from tests.helpers import job_body, write_recipe


def story_recipe(tmp_path: Path, model: Path, train: Path, seed: int = 0, **data):
    """A text recipe whose cache lies under tmp_path unless data.cache_dir says otherwise."""
    data = {"cache_dir": str(tmp_path / "cache"), **data}
    return validate_data(
        {
            "name": "cache",
            "model": {"name_or_path": str(model)},
            "data": {"train": str(train), "max_length": 32, **data},
            "train": {"seed": seed},
            "checkpoint": {"storage_path": str(tmp_path / "runs")},
        }
    )


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl([{"text": t} for t in story_lines(120, seed=1)], tmp_path / "train.jsonl")


def tokenizer_of(model: Path):
    from launcher.models import load_tokenizer

    return load_tokenizer(story_recipe(model, model, model / "unread.jsonl").model)


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    return tokenizer_of(tiny_gpt2)


def rows_of(ds) -> list[dict]:
    return [
        {k: v.tolist() if hasattr(v, "tolist") else v for k, v in row.items()}
        for row in ds.take_all()
    ]


def touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_cache_root_defaults_to_the_user_cache_and_honours_cache_dir(
    tmp_path, tiny_gpt2, train_file
):
    recipe = story_recipe(tmp_path, tiny_gpt2, train_file, cache_dir=None)
    assert P.cache_root(recipe) == Path.home() / ".cache" / "ftlaunch" / "prepared"
    own = story_recipe(tmp_path, tiny_gpt2, train_file, cache_dir=str(tmp_path / "c"))
    assert P.cache_root(own) == tmp_path / "c"


def test_fingerprint_follows_sources_settings_and_tokenizer(
    tmp_path, tiny_gpt2, tiny_bert, train_file, gpt2_tok
):
    recipe = story_recipe(tmp_path, tiny_gpt2, train_file)
    key, _ = P.fingerprint(recipe, gpt2_tok)
    assert P.fingerprint(recipe, gpt2_tok)[0] == key  # stable
    # cache_dir only says where: same key.
    moved = story_recipe(tmp_path, tiny_gpt2, train_file, cache_dir=str(tmp_path / "c"))
    assert P.fingerprint(moved, gpt2_tok)[0] == key
    changed = [
        story_recipe(tmp_path, tiny_gpt2, train_file, max_length=64),
        story_recipe(tmp_path, tiny_gpt2, train_file, packing=True),
        story_recipe(tmp_path, tiny_gpt2, train_file, split={"seed": 3}),
        story_recipe(tmp_path, tiny_gpt2, train_file, seed=9),
    ]
    keys = {P.fingerprint(r, gpt2_tok)[0] for r in changed}
    assert key not in keys and len(keys) == len(changed)
    bert = tokenizer_of(tiny_bert)
    assert P.fingerprint(recipe, bert)[0] != key
    touch_later(train_file)
    assert P.fingerprint(recipe, gpt2_tok)[0] != key


def test_incomplete_entries_are_never_read(tmp_path):
    entry = tmp_path / "abc"
    (entry / "train").mkdir(parents=True)
    assert P.read_meta(entry) is None  # no metadata: a crash before the rename
    (entry / P.META_FILE).write_text('{"cache_format": 1, "splits": {"tra')
    assert P.read_meta(entry) is None  # truncated metadata
    meta = {"cache_format": P.CACHE_FORMAT, "splits": {"train": {}, "validation": {}}}
    (entry / P.META_FILE).write_text(json.dumps(meta))
    assert P.read_meta(entry) is None  # a split folder missing
    (entry / "validation").mkdir()
    assert P.read_meta(entry) == meta


def test_second_prepare_reads_the_cache_without_tokenizing(
    ray_session, tmp_path, tiny_gpt2, train_file, gpt2_tok
):
    recipe = story_recipe(tmp_path, tiny_gpt2, train_file)
    first_slot = P.lookup(recipe, gpt2_tok)
    assert not first_slot.hit
    first = P.load_or_prepare(first_slot, recipe, gpt2_tok)
    assert first.cache["reused"] is False
    assert first.tokenization_runs()["train"]["rows_in"] == first.raw_rows["train"]
    assert not list(first_slot.root.glob(".tmp-*"))  # the temporary directory was renamed

    second_slot = P.lookup(recipe, gpt2_tok)
    assert second_slot.hit and second_slot.fingerprint == first_slot.fingerprint
    second = P.load_or_prepare(second_slot, recipe, gpt2_tok)
    assert second.cache["reused"] is True
    assert second.tokenization_runs() == {}  # nothing tokenized
    assert second.num_rows == first.num_rows and second.num_tokens == first.num_tokens
    assert second.raw_rows == first.raw_rows
    for split in first.datasets:  # the same rows in the same order
        assert rows_of(second.datasets[split]) == rows_of(first.datasets[split])

    touch_later(train_file)
    assert not P.lookup(recipe, gpt2_tok).hit
    longer = story_recipe(tmp_path, tiny_gpt2, train_file, max_length=48)
    assert not P.lookup(longer, gpt2_tok).hit


@pytest.mark.ray_job
def test_prepare_then_submit_tokenizes_once(ray_session, tiny_gpt2, story_data, tmp_path):
    from launcher.job import run

    body = job_body(
        tmp_path, tiny_gpt2, story_data, name="prepared", train={"epochs": 1, "max_steps": 2}
    )
    body["scaling"]["num_workers"] = 1  # the data stage is the driver's: one worker will do
    body["data"]["cache_dir"] = str(tmp_path / "cache")
    path = write_recipe(tmp_path, body)
    out = CliRunner().invoke(cli, ["prepare", str(path)])
    assert out.exit_code == 0, out.output
    assert "prepared data: " in out.output and "fingerprint: " in out.output
    assert "(written)" in out.output
    again = CliRunner().invoke(cli, ["prepare", str(path)])
    assert again.exit_code == 0 and "reused" in again.output

    recipe = load_recipe(path)
    notes: list[str] = []

    class View(ProgressView):
        def note(self, text: str) -> None:
            notes.append(text)
            super().note(text)

    summary = run(recipe, view=View())
    facts = summary["data"]
    assert facts["prepared"]["reused"] is True
    assert facts["tokenization"] == {}  # the submit tokenized nothing: prepare did it once
    assert any(
        n.startswith(f"prepared data: reusing {facts['prepared']['fingerprint']}") for n in notes
    )
    meta = json.loads((Path(facts["prepared"]["path"]) / P.META_FILE).read_text())
    assert facts["rows"] == {k: v["rows"] for k, v in meta["splits"].items()}
