"""Distillation through the real job: online and offline teachers (two Ray Train workers where
the teacher is sharded with the student), the teacher-output cache, the vocabulary check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import job_body, write_recipe

from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import read_metrics


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 3-layer GPT-2 with the same tokenizer as the tiny_gpt2 student (same corpus)."""
    from launcher.dev.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "gpt2", "gpt2", layers=3, seed=7)


def distill_recipe(tmp_path, student, teacher, data, **distill) -> dict:
    return job_body(
        tmp_path,
        student,
        data,
        name="tiny-distill",
        train={"max_steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 2, "seed": 0},
        checkpoint={"metric": "eval_loss"},
        distill={
            "teacher": {"name_or_path": str(teacher)},
            "temperature": 2.0,
            "alpha": 0.5,
            **distill,
        },
    )


def distill_metrics(run_dir: Path) -> list[dict]:
    rows = [m for m in read_metrics(run_dir) if "distill_loss" in m]
    assert rows, read_metrics(run_dir)
    for m in rows:
        assert math.isfinite(m["task_loss"]) and math.isfinite(m["distill_loss"])
        # loss = alpha * task + (1 - alpha) * distill, averaged over the same micro-batches
        assert m["loss"] == pytest.approx(0.5 * m["task_loss"] + 0.5 * m["distill_loss"], rel=1e-4)
    return rows


@pytest.mark.ray_job
@pytest.mark.slow
def test_online_distillation_learns_with_the_teacher_beside_the_student(
    ray_session, tiny_gpt2, tiny_teacher, story_data, tmp_path
):
    body = distill_recipe(tmp_path, tiny_gpt2, tiny_teacher, story_data)
    # One worker, in this process: two-worker distillation runs in the sharded-teacher tests.
    body["scaling"]["num_workers"] = 1
    summary = run(load_recipe(write_recipe(tmp_path, body)))
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "succeeded" and summary["steps"] == 6
    rows = distill_metrics(run_dir)
    assert rows[-1]["task_loss"] < rows[0]["task_loss"]
    assert (run_dir / "model" / "config.json").exists()


def cache_entries(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("teacher/*/meta.json"))]


@pytest.mark.ray_job
@pytest.mark.slow
def test_offline_teacher_pass_runs_once_and_a_second_run_reuses_it(
    ray_session, tiny_gpt2, tiny_teacher, story_data, tmp_path
):
    cache = tmp_path / "cache"
    body = distill_recipe(
        tmp_path, tiny_gpt2, tiny_teacher, story_data, mode="offline", top_k=8, cache_dir=str(cache)
    )
    body["scaling"]["num_workers"] = 1  # the teacher pass is the data stage's: one worker will do
    first = run(load_recipe(write_recipe(tmp_path, body)))
    [entry] = cache_entries(cache)
    assert entry["teacher_passes"] == 1 and entry["reuses"] == 0
    assert entry["rows"] == 260 and entry["settings"]["top_k"] == 8
    rows = distill_metrics(Path(first["run_dir"]))
    assert rows[-1]["task_loss"] < rows[0]["task_loss"]

    # The stored columns sit beside the tokens: top_k per token, flattened.
    import pyarrow.parquet as pq

    table = pq.read_table(cache / "teacher" / entry["key"] / "rows")
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["teacher_logprobs"]) == len(row["teacher_ids"]) == 8 * len(row["input_ids"])
    assert max(row["teacher_logprobs"]) <= 0

    # Training settings are not part of the key: a second run reuses the stored outputs.
    body["train"]["max_steps"] = 2
    second = run(load_recipe(write_recipe(tmp_path, body)))
    assert second["status"] == "succeeded"
    [entry] = cache_entries(cache)
    assert entry["teacher_passes"] == 1 and entry["reuses"] == 1
    distill_metrics(Path(second["run_dir"]))


def test_vocabulary_mismatch_exits_2_before_training(ray_session, tiny_gpt2, story_data, tmp_path):
    from click.testing import CliRunner

    from launcher.cli import cli
    from launcher.dev.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "gpt2", vocab_size=300)
    body = distill_recipe(tmp_path, tiny_gpt2, other, story_data)
    body["scaling"] = {"num_workers": 1}
    result = CliRunner().invoke(cli, ["submit", str(write_recipe(tmp_path, body))])
    assert result.exit_code == 2, result.output
    assert "different tokenizer vocabulary" in result.output
    assert "First differences: id " in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # failed before a run directory was made


def test_student_from_teacher_layers_is_built_once_into_the_cache(
    tiny_gpt2, tiny_teacher, tmp_path
):
    from transformers import AutoConfig, AutoTokenizer

    from launcher.distill import build_student_dir
    from launcher.recipe import validate_data

    recipe = validate_data(
        {
            "name": "s",
            "model": {"name_or_path": str(tiny_gpt2)},
            "data": {"train": "x.jsonl"},
            "distill": {
                "teacher": {"name_or_path": str(tiny_teacher)},
                "init_student_from_teacher": [0, 2],
                "cache_dir": str(tmp_path / "cache"),
            },
        }
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    built = build_student_dir(recipe, tokenizer)
    assert AutoConfig.from_pretrained(built).n_layer == 2
    assert (built / "tokenizer.json").exists()
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert build_student_dir(recipe, tokenizer) == built  # reused, not rebuilt
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [{"name": "fsdp"}, {"name": "deepspeed", "zero_stage": 3}],
    ids=["fsdp", "zero3"],
)
@pytest.mark.ray_job
def test_online_teacher_is_sharded_with_the_student(
    ray_session, tiny_gpt2, tiny_teacher, story_data, tmp_path, strategy
):
    body = distill_recipe(tmp_path, tiny_gpt2, tiny_teacher, story_data)
    body["strategy"] = strategy
    body["train"]["max_steps"] = 4
    summary = run(load_recipe(write_recipe(tmp_path, body)))
    assert summary["status"] == "succeeded" and summary["steps"] == 4
    distill_metrics(Path(summary["run_dir"]))


@pytest.mark.ray_job
def test_teacher_pass_in_the_driver_matches_the_actor_pool(
    ray_session, tiny_gpt2, tiny_teacher, story_data, tmp_path, monkeypatch
):
    """A small CPU pass runs in the driver; the columns it stores are the pool actor's."""
    import pyarrow.parquet as pq

    from launcher.distill import prepare_distillation
    from launcher.job import open_data
    from launcher.prepared import load_or_prepare

    stored = {}
    data = None
    for where in ("driver", "pool"):
        cache = tmp_path / where
        body = distill_recipe(
            tmp_path,
            tiny_gpt2,
            tiny_teacher,
            story_data,
            mode="offline",
            top_k=4,
            cache_dir=str(cache),
        )
        body["data"]["cache_dir"] = str(tmp_path / "prepared")
        recipe = load_recipe(write_recipe(tmp_path, body, f"{where}.yaml"))
        if data is None:  # one tokenization serves both teacher passes
            tokenizer, slot, tables = open_data(recipe)
            data = load_or_prepare(slot, recipe, tokenizer, tables=tables)
        monkeypatch.setenv("FTLAUNCH_IN_PROCESS", "1" if where == "driver" else "0")
        prepare_distillation(recipe, data, tokenizer)
        [entry] = cache_entries(cache)
        table = pq.read_table(cache / "teacher" / entry["key"] / "rows")
        stored[where] = sorted(table.to_pylist(), key=lambda r: r["input_ids"])
    assert len(stored["driver"]) == len(stored["pool"]) == 260
    for here, pooled in zip(stored["driver"], stored["pool"], strict=True):
        assert here["input_ids"] == pooled["input_ids"]
        assert here["teacher_ids"] == pooled["teacher_ids"]
        assert here["teacher_logprobs"] == pytest.approx(pooled["teacher_logprobs"], abs=1e-5)
