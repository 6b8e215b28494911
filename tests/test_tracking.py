"""Experiment trackers fed by a real (tiny) two-worker job, read back with each library's reader.

One job is one tracked run, whatever the number of workers: the driver logs rank 0's reports.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import job_body, write_recipe

from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import read_metrics
from launcher.tracking import flatten, numeric


def tracked_recipe(tmp_path: Path, model: Path, data: dict, name: str = "tracked") -> Path:
    body = job_body(
        tmp_path,
        model,
        data,
        name=name,
        train={"max_steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 2, "eval_every": 3},
        checkpoint={"every": 2},  # steps 2 and 4 checkpoint between evaluations
        tracking={
            "tensorboard": True,
            "mlflow": {"experiment": "ftlaunch-tests"},
            "wandb": {"project": "ftlaunch-tests", "mode": "offline"},
        },
    )
    body["scaling"]["num_workers"] = 1  # the driver tracks; where the loop runs does not matter
    return write_recipe(tmp_path, body, f"{name}.yaml")


@pytest.fixture(scope="module")
def tracked_run(ray_session, tiny_gpt2, story_data, tmp_path_factory):
    """One tracked job; its run directory, recipe and reports."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    recipe = load_recipe(tracked_recipe(tmp_path, tiny_gpt2, story_data))
    summary = run(recipe)
    run_dir = Path(summary["run_dir"])
    reports = [r for r in read_metrics(run_dir) if "event" not in r]
    return run_dir, recipe, reports


def series(reports: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in reports if key in r]


def assert_same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


@pytest.mark.ray_job
@pytest.mark.slow  # shares one tracked job
def test_evaluations_are_on_record_at_the_steps_they_ran_only(tracked_run):
    """eval_every 3: steps 3 and 6, and step 2, whose checkpoint needs a score before any
    evaluation ran. Step 4's checkpoint is scored by step 3's evaluation, which is not repeated
    in the record as if it had run again."""
    _, _, reports = tracked_run
    evals = series(reports, "eval_loss")
    assert [step for step, _ in evals] == [2, 3, 6]
    assert len({value for _, value in evals}) == 3


@pytest.mark.ray_job
@pytest.mark.slow  # shares one tracked two-worker job
def test_tensorboard_event_file_reads_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, reports = tracked_run
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, f"one writer per job, found {files}"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "lr", "eval_loss", "eval_perplexity"} <= scalars
    assert "step" not in scalars  # the x axis, not a series
    for key in ("loss", "eval_loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert_same_series(logged, series(reports, key))
    assert "recipe/text_summary" in events.Tags()["tensors"]  # the resolved recipe, as text


@pytest.mark.ray_job
@pytest.mark.slow  # shares one tracked two-worker job
def test_mlflow_file_store_holds_one_run_with_the_recipe_as_params(tracked_run):
    from mlflow import MlflowClient

    run_dir, recipe, reports = tracked_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("ftlaunch-tests")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one MLflow run per job, not per worker"
    (mlrun,) = runs
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == run_dir.name
    params = mlrun.data.params
    assert params["train.lr"] == str(recipe.train.lr)
    assert params["scaling.num_workers"] == "1"
    assert params["model.name_or_path"] == recipe.model.name_or_path
    assert params["tracking.mlflow.experiment"] == "ftlaunch-tests"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert_same_series([(m.step, m.value) for m in history], series(reports, "loss"))
    evals = client.get_metric_history(mlrun.info.run_id, "eval_loss")
    assert [m.step for m in evals] == [s for s, _ in series(reports, "eval_loss")]
    assert mlrun.data.metrics["loss"] == pytest.approx(series(reports, "loss")[-1][1])


@pytest.mark.ray_job
@pytest.mark.slow  # shares one tracked two-worker job
def test_wandb_offline_run_files_exist(tracked_run):
    from launcher.tracking import run_id_for

    run_dir, recipe, reports = tracked_run
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, f"one W&B run per job, found {offline}"
    (record_file,) = offline[0].glob("run-*.wandb")
    assert record_file.name == f"run-{run_id_for(run_dir)}.wandb"
    records = wandb_records(record_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name) == (run_id_for(run_dir), run_dir.name)
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["lr"] == recipe.train.lr
    assert config["scaling"]["num_workers"] == 1
    logged = [
        (int(values["_step"]), float(values["loss"]))
        for values in (
            {item.nested_key[0]: json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        )
        if "loss" in values
    ]
    assert_same_series(logged, series(reports, "loss"))
    assert records[-1].WhichOneof("record_type") == "exit"  # the run was finished


WANDB_HEADER = 7  # ":W&B", a 2-byte magic and a version byte
WANDB_BLOCK = 32 * 1024


def wandb_records(path: Path) -> list:
    """The protobuf Records of a W&B run file (LevelDB log framing: 32 kB blocks of
    checksum / length / kind chunks; a record may span blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, raw, pending = WANDB_HEADER, [], b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            raw.append(pending)
    records = []
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


def test_reports_and_params_are_flattened_for_trackers():
    assert flatten({"train": {"lr": 1e-3, "betas": [0.9, 0.99]}, "name": "x"}) == {
        "train.lr": 1e-3,
        "train.betas": "[0.9, 0.99]",
        "name": "x",
    }
    assert numeric({"step": 3, "loss": 1.5, "ok": True, "nan": float("nan"), "tag": "a"}) == {
        "loss": 1.5
    }


def small_recipe(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: resumed\nmodel: {name_or_path: gpt2}\ndata: {train: a.jsonl}\n"
        "tracking: {mlflow: {experiment: resumed}}\n"
    )
    return load_recipe(path)


def test_a_resumed_job_continues_its_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from launcher.tracking import MlflowTracker

    recipe, run_dir = small_recipe(tmp_path), tmp_path / "resumed-20260101-000000"
    first = MlflowTracker(recipe, run_dir)
    first.log({"step": 1, "loss": 2.0}, 1)
    first.close()
    again = MlflowTracker(recipe, run_dir)  # the same run directory: a resume
    again.log({"step": 2, "loss": 1.0}, 2)
    again.close()
    assert again.run_id == first.run_id
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    history = client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    other = MlflowTracker(recipe, tmp_path / "resumed-20260101-000001")
    assert other.run_id != first.run_id


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(capsys):
    from launcher.tracking import Trackers

    class Broken:
        name = "broken"

        def log(self, metrics, step):
            raise ConnectionError("tracking server went away")

        def close(self):
            raise AssertionError("a dropped tracker is not closed")

    class Recording:
        name = "recording"

        def __init__(self):
            self.seen, self.closed = [], False

        def log(self, metrics, step):
            self.seen.append(step)

        def close(self):
            self.closed = True

    good = Recording()
    trackers = Trackers([Broken(), good])
    trackers.log({"loss": 1.0}, 1)
    trackers.log({"loss": 0.5}, 2)
    trackers.close()
    assert good.seen == [1, 2] and good.closed
    err = capsys.readouterr().err
    assert err.count("warning: broken tracking stopped") == 1
    assert "tracking server went away" in err
