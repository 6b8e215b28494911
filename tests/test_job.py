"""End-to-end training jobs on the shared local Ray: real workers, gloo, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import job_body, run_python, write_recipe

from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import latest_checkpoint, read_metrics

CONTRACT = ["recipe.yaml", "metrics.jsonl", "checkpoints", "model", "summary.json", "metrics.png"]


def causal_recipe(tmp_path: Path, model: Path, files: dict, **sections) -> dict:
    train = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "log_every": 2, "seed": 0}
    body = job_body(tmp_path, model, files, name="tiny-lm", train=train)
    for key, value in sections.items():
        body.setdefault(key, {}).update(value)
    return body


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def assert_contract(run_dir: Path) -> dict:
    for name in CONTRACT:
        assert (run_dir / name).exists(), f"{name} missing from {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["steps"] > 0 and summary["tokens"] > 0
    assert load_recipe(run_dir / "recipe.yaml").name == summary["name"]
    assert_one_node_placement(summary)
    return summary


def assert_one_node_placement(summary: dict) -> None:
    """Every rank is on record, on the test session's one Ray node."""
    import ray

    placement = summary["placement"]
    assert placement["nodes"] == 1
    assert [r["rank"] for r in placement["ranks"]] == list(range(summary["num_workers"]))
    assert {r["node_id"] for r in placement["ranks"]} == {ray.get_runtime_context().get_node_id()}
    assert all(r["node_ip"] for r in placement["ranks"])


def live_actors() -> dict[str, str]:
    """Live actors by id, from the GCS's actor table (ray.util.state.list_actors asks the
    dashboard, which the test session does not start); Ray's detached ones are per Ray
    instance, not per job."""
    from ray._private.state import actors

    return {
        i: a["ActorClassName"]
        for i, a in actors().items()
        if a["State"] == "ALIVE" and not a["IsDetached"]
    }


@dataclass
class TwoWorkerRun:
    summary: dict
    run_dir: Path  # the run directory on the storage URI
    staging: Path  # where the driver staged it
    actors_before: dict[str, str]


@pytest.fixture(scope="module")
def two_worker_run(ray_session, tiny_gpt2, instruction_data, tmp_path_factory) -> TwoWorkerRun:
    """One two-worker job on instruction rows whose storage is a file:// URI, and the actors
    alive before it: training, export, the instruction format, URI storage and the
    no-leftover-actor check all read this run (plain-text jobs of two workers: the restart,
    elastic and preemption tests)."""
    tmp_path = tmp_path_factory.mktemp("two-worker")
    remote_root = tmp_path / "bucket"
    body = causal_recipe(
        tmp_path,
        tiny_gpt2,
        instruction_data,
        data={"format": "instruction", "max_length": 128},
        checkpoint={"storage_path": f"file://{remote_root}"},
    )
    before = live_actors()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTLAUNCH_STAGING", str(tmp_path / "staging"))
        summary = run(load_recipe(write_recipe(tmp_path, body)))
    (run_dir,) = remote_root.iterdir()  # the whole run directory, uploaded
    return TwoWorkerRun(summary, run_dir, tmp_path / "staging", before)


@pytest.mark.ray_job
def test_two_workers_train_on_instructions_export_and_reload(two_worker_run, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from launcher.export import consolidate

    run_dir = two_worker_run.run_dir
    summary = assert_contract(run_dir)
    assert summary["num_workers"] == 2

    seen = losses(run_dir)
    assert seen[-1] < seen[0] * 0.8, f"loss did not fall: {seen}"
    evals = [m for m in read_metrics(run_dir) if "eval_perplexity" in m]
    assert len(evals) == 2  # once per epoch
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    steps = [m["step"] for m in read_metrics(run_dir) if "step" in m]
    assert steps == sorted(steps) and len(steps) == len(set(steps))

    # model/ reloads with the weights of the exported checkpoint: same logits.
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    checkpoint = Path(two_worker_run.summary["export"]["checkpoint"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    reference.load_state_dict(consolidate("ddp", checkpoint))
    batch = torch.randint(0, 400, (2, 12))
    torch.testing.assert_close(logits_of(exported, batch), logits_of(reference, batch))
    assert not torch.allclose(
        logits_of(AutoModelForCausalLM.from_pretrained(tiny_gpt2), batch),
        logits_of(exported, batch),
    )


@pytest.mark.ray_job
def test_classification_learns_and_exports_its_labels(
    ray_session, tiny_bert, review_data, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    body = {
        "name": "tiny-cls",
        "model": {
            "name_or_path": str(tiny_bert),
            "task": "classification",
            "labels": ["negative", "positive"],
        },
        "data": {
            "train": str(review_data["train"]),
            "validation": str(review_data["validation"]),
            "format": "classification",
            "max_length": 32,
        },
        "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "log_every": 2, "eval_on_start": True},
        "scaling": {"num_workers": 1},  # two-worker classification: the quickstart test
        "checkpoint": {
            "storage_path": str(tmp_path / "runs"),
            "metric": "eval_accuracy",
            "mode": "max",
        },
    }
    summary = run(load_recipe(write_recipe(tmp_path, body)))
    run_dir = Path(summary["run_dir"])
    assert_contract(run_dir)
    evals = [m for m in read_metrics(run_dir) if "eval_accuracy" in m]
    assert evals[0]["step"] == 0
    assert evals[-1]["eval_accuracy"] >= 0.9 > evals[0]["eval_accuracy"]
    assert 0 <= evals[-1]["eval_f1"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.ray_job
def test_resume_matches_uninterrupted_run(
    ray_session, tiny_gpt2, story_data, tmp_path, monkeypatch
):
    """Stopped at step 6, resumed: the same final weights as one run straight through."""
    from safetensors.torch import load_file

    from launcher.train import JobError

    def body(storage: str) -> dict:
        return causal_recipe(
            tmp_path,
            tiny_gpt2,
            story_data,
            train={"max_steps": 12, "batch_size": 8, "log_every": 1, "scheduler": "cosine"},
            scaling={"num_workers": 1},
            checkpoint={
                "storage_path": str(tmp_path / storage),
                "every": 3,
                "metric": None,
                "keep": None,
            },
        )

    straight = run(load_recipe(write_recipe(tmp_path, body("straight"))))
    assert_one_node_placement(straight)  # trained in this process: rank 0 on the driver's node

    monkeypatch.setenv("FTLAUNCH_FAIL_AT_STEP", "7")
    monkeypatch.setenv("FTLAUNCH_FAIL_RANK", "0")
    recipe = load_recipe(write_recipe(tmp_path, body("stopped")))
    with pytest.raises(JobError):
        run(recipe)
    run_dir = next((tmp_path / "stopped").iterdir())
    assert json.loads((latest_checkpoint(run_dir) / "ftlaunch_state.json").read_text())["step"] == 6
    monkeypatch.delenv("FTLAUNCH_FAIL_AT_STEP")
    monkeypatch.chdir(tmp_path)  # --resume as a user types it: relative to where they are
    resumed = run(recipe, resume=Path("stopped") / run_dir.name)

    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6] == 7  # continues, does not restart at 1
    assert resumed["steps"] == straight["steps"]
    a = load_file(Path(straight["run_dir"]) / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_resume_without_a_checkpoint_fails_before_any_work(tiny_gpt2, tmp_path):
    from click.testing import CliRunner

    from launcher.cli import cli

    missing = {
        split: tmp_path / f"not-written-yet-{split}.jsonl" for split in ("train", "validation")
    }
    body = causal_recipe(tmp_path, tiny_gpt2, missing)
    empty = tmp_path / "runs" / "tiny-lm-20260101-000000"
    empty.mkdir(parents=True)
    out = CliRunner().invoke(
        cli, ["submit", str(write_recipe(tmp_path, body)), "--resume", str(empty)]
    )
    assert out.exit_code == 2, out.output
    assert f"--resume {empty}: no checkpoint found under {empty}/checkpoints" in out.output
    assert "not-written-yet" not in out.output and "Traceback" not in out.output


def test_bad_data_fails_with_exit_2_before_training(tiny_bert, tmp_path):
    from click.testing import CliRunner

    from launcher.cli import cli

    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine", "label": "positive"}\n{"text": "odd", "label": "maybe"}\n')
    body = {
        "name": "bad",
        "model": {
            "name_or_path": str(tiny_bert),
            "task": "classification",
            "labels": ["negative", "positive"],
        },
        "data": {"train": str(data), "format": "classification"},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "metric": None},
    }
    result = CliRunner().invoke(cli, ["submit", str(write_recipe(tmp_path, body))])
    assert result.exit_code == 2, result.output
    assert (
        "maybe" in result.output
        and "bad.jsonl" in result.output
        and "Traceback" not in result.output
    )
    assert not list((tmp_path / "runs").glob("*/checkpoints/checkpoint_*"))


@pytest.mark.ray_job
def test_ftlaunch_export_writes_the_same_model_and_prints_only_its_own_lines(
    two_worker_run, tmp_path
):
    """`ftlaunch export RUN --out DIR` as a user runs it: the checkpoint the run exported, the
    same weights, and on the terminal its own lines only (no library warnings or bars)."""
    from safetensors.torch import load_file

    run_dir = two_worker_run.run_dir
    out = tmp_path / "exported"
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "export", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = Path(two_worker_run.summary["export"]["checkpoint"]).name
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"exported {run_dir / 'checkpoints' / checkpoint} to {out / 'model'}",
        "model/ is the trained model",
    ]
    ours, theirs = (load_file(d / "model" / "model.safetensors") for d in (out, run_dir))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


@pytest.mark.ray_job
def test_uri_storage_puts_the_whole_run_directory_there(two_worker_run):
    remote = two_worker_run.run_dir
    assert two_worker_run.summary["storage"] == f"file://{remote}"
    assert list((remote / "checkpoints").glob("checkpoint_*/ftlaunch_state.json"))
    staged = two_worker_run.staging / remote.name
    assert not list(staged.glob("checkpoints/checkpoint_*"))  # checkpoints went straight to storage


@pytest.mark.ray_job
def test_no_actor_of_a_job_outlives_it(two_worker_run, tiny_gpt2, story_data, tmp_path):
    """Two jobs in one Ray instance (the two-worker one, then a one-worker one in this process):
    the report channel, the tokenization ledger and Ray Train's controller, workers
    and data coordinators of both are gone after the second."""
    body = causal_recipe(tmp_path, tiny_gpt2, story_data, train={"max_steps": 2})
    body["name"], body["scaling"]["num_workers"] = "second", 1
    run(load_recipe(write_recipe(tmp_path, body)))
    left = {i: c for i, c in live_actors().items() if i not in two_worker_run.actors_before}
    assert not left, f"actors still alive after their job: {sorted(left.values())}"


def test_an_embedded_ray_starts_no_preemption_watcher(two_worker_run):
    """Nothing drains the one node of the Ray ftlaunch starts itself: Ray Train's preemption
    watcher (one more process per worker group) is left out there, and only there."""
    from ray._private.state import actors

    from launcher.raysession import ray_job_env

    started = {a["ActorClassName"] for a in actors().values()}
    assert "RayTrainWorker" in started and "PreemptionWatcher" not in started, started
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in ray_job_env(embedded=False)


def test_in_process_keeps_and_picks_checkpoints_like_ray_train(tmp_path):
    """The in-process loop keeps the best `keep` by the metric (the newest always stays) and the
    driver picks the best kept one from metrics.jsonl, else the newest."""
    from launcher.rundir import STATE_FILE
    from launcher.train import in_process_result, pick_checkpoint
    from launcher.train_loop import prune_checkpoints

    ckpts = tmp_path / "checkpoints"
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 5.0}
    scores: dict[int, float | None] = {}
    for step, loss in losses.items():
        directory = ckpts / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        (directory / STATE_FILE).write_text(json.dumps({"step": step}))
        scores[step] = loss
        prune_checkpoints(ckpts, scores, keep=2, mode="min")
    # 2 went when 6 came; 8 is the worst but the newest, so it stays and so does 6 (Ray Train
    # deletes only the worst, never the newest: one more than `keep` until the next report).
    kept = sorted(p.name for p in ckpts.iterdir())
    assert kept == ["checkpoint_000004", "checkpoint_000006", "checkpoint_000008"]

    records = [{"step": s, "eval_loss": v} for s, v in losses.items()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = in_process_result(tmp_path)
    assert Path(result.checkpoint.path).name == "checkpoint_000008"
    best = pick_checkpoint(result, "eval_loss", "min", tmp_path)
    assert Path(best.path).name == "checkpoint_000004"
    assert Path(pick_checkpoint(result, "eval_loss", "max", tmp_path).path).name.endswith("08")
    assert Path(pick_checkpoint(result, None, "min", tmp_path).path).name.endswith("08")


def test_a_checkpoint_between_evaluations_is_scored_by_the_newest_one(tmp_path):
    from launcher.rundir import STATE_FILE
    from launcher.train import in_process_result, pick_checkpoint

    for step in (3, 5):
        directory = tmp_path / "checkpoints" / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        (directory / STATE_FILE).write_text(json.dumps({"step": step}))
    records = [
        {"step": 2, "loss": 3.0, "eval_loss": 2.0},
        {"step": 3, "loss": 2.5},
        {"step": 4, "loss": 2.0, "eval_loss": 1.5},
        {"step": 5, "loss": 1.8},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = in_process_result(tmp_path)
    assert [m["eval_loss"] for _, m in result.best_checkpoints] == [2.0, 1.5]
    assert Path(pick_checkpoint(result, "eval_loss", "max", tmp_path).path).name.endswith("03")
    assert Path(pick_checkpoint(result, "loss", "max", tmp_path).path).name.endswith("03")


@pytest.mark.parametrize("mode", ["max", "min"])
def test_of_checkpoints_that_score_alike_the_later_is_exported(tmp_path, mode):
    """eval_accuracy stuck at one value (a small validation split): the checkpoint trained
    longest, not the first one."""
    from launcher.rundir import STATE_FILE
    from launcher.train import in_process_result, pick_checkpoint

    for step in (5, 10, 15):
        directory = tmp_path / "checkpoints" / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        (directory / STATE_FILE).write_text(json.dumps({"step": step}))
    worse = 0.5 if mode == "max" else 0.95
    records = [{"step": s, "eval_accuracy": a} for s, a in ((5, 0.87), (10, 0.87), (15, worse))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = pick_checkpoint(in_process_result(tmp_path), "eval_accuracy", mode, tmp_path)
    assert Path(best.path).name == "checkpoint_000010"


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_the_final_report_suggests_only_what_works_for_the_task(task):
    from launcher.summary import final_report

    summary = {"run_dir": "/runs/r", "status": "succeeded", "steps": 3, "wall_time_s": 1.0}
    lines = final_report({**summary, "task": task, "method": "full"})
    assert any("ftlaunch generate /runs/r" in line for line in lines) == (task == "causal_lm")
    pipeline = "text-generation" if task == "causal_lm" else "text-classification"
    assert f"pipeline('{pipeline}', model='/runs/r/model')" in lines[-1]
    # prefix, prompt, adapter: model/ alone is the base, so no plain pipeline on it
    lines = final_report({**summary, "task": task, "export": {"standalone": False}})
    assert "pipeline(" not in "\n".join(lines)
    assert "load_exported_model('/runs/r')" in lines[-1]


def test_summary_places_each_rank_of_the_newest_worker_group(tmp_path):
    """Workers report their node through the channel; a restarted, smaller group replaces the
    ranks of the one before."""
    import threading

    from helpers import minimal_recipe

    from launcher.channel import LocalChannel
    from launcher.rundir import RunState
    from launcher.summary import write_summary
    from launcher.train import drain_reports

    ips = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    channel = LocalChannel()
    for rank, world_size, node in ((0, 3, "a"), (1, 3, "b"), (2, 3, "b"), (1, 2, "c")):
        event = {"rank": rank, "world_size": world_size, "node_id": node, "node_ip": ips[node]}
        channel.put({"event": "placement", **event})
    state, stop = RunState(tmp_path), threading.Event()
    stop.set()  # drain what is queued, then return
    drain_reports(channel, state, None, stop, None)
    recipe = minimal_recipe(scaling={"num_workers": 2, "placement": "spread"})
    summary = write_summary(recipe, state, "succeeded", {}, None)
    assert summary["placement"] == {
        "strategy": "spread",
        "nodes": 2,
        "ranks": [
            {"rank": 0, "node_id": "a", "node_ip": "10.0.0.1"},
            {"rank": 1, "node_id": "c", "node_ip": "10.0.0.3"},
        ],
    }
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["placement"] == summary["placement"]
    assert not read_metrics(tmp_path)  # placement is no metric


@pytest.mark.parametrize("address", [None, "10.0.0.9:6379"])
def test_a_ray_that_will_not_start_is_retried_once_then_explained(monkeypatch, address):
    """An embedded start gets a second try (Ray gives a node 30 s to register); a cluster that
    cannot be joined does not. Either way: a JobFailedError that says what to do, exit 1."""
    import ray

    from launcher.errors import exit_code_for
    from launcher.raysession import RayStartError, ensure_ray

    calls: list[str] = []

    def refuse(**kwargs):
        calls.append("init")
        raise Exception("The current node timed out during startup.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with pytest.raises(RayStartError) as failed:
        ensure_ray(address=address)
    assert exit_code_for(failed.value) == 1
    assert "timed out during startup" in str(failed.value)
    if address is None:
        assert calls == ["init", "shutdown", "init", "shutdown"]
        assert "could not start Ray on this machine (2 tries)" in str(failed.value)
        assert "ray start --head" in str(failed.value)
    else:
        assert calls == ["init", "shutdown"]
        assert f"could not join the Ray cluster at {address}" in str(failed.value)


def test_library_notes_made_on_import_stay_off_the_terminal():
    """Without --verbose, bitsandbytes' import prints nothing: on CPUs with AVX512-BF16 it notes
    a missing optional kernel package, and peft imports it (every LoRA run) when installed. Nor
    do the libraries' deprecation notices about their own internals."""
    script = (
        "from launcher.raysession import quiet_libraries\n"
        "quiet_libraries(verbose=False)\n"
        "import bitsandbytes\n"
        # what peft reads when it wraps a model (every LoRA run): a deprecated property
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "config = GPT2Config(\n"
        "    n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=8, bos_token_id=0,\n"
        "    eos_token_id=0\n"
        ")\n"
        "GPT2LMHeadModel(config).is_gradient_checkpointing\n"
    )
    done = run_python(script)
    assert (done.stdout, done.stderr) == ("", "")


def test_errors_the_cluster_publishes_reach_the_terminal_one_line_each(
    ray_session, monkeypatch, capfd
):
    """Published through the GCS as Ray publishes a lost node or a worker killed for memory,
    received by the driver's own listener thread: one `cluster:` line each, no `(raylet)` block."""
    import time

    import ray._private.worker as ray_worker
    from ray._private.utils import publish_error_to_driver

    from launcher.raysession import restate_cluster_errors

    # restored after the test: the session's Ray keeps printing as Ray does
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    restate_cluster_errors()
    restate_cluster_errors()  # a second call changes nothing: one line per error still
    node = "7c" * 28
    lost = (
        f"The node with node id: {node} and address: 10.1.2.3 and node name: 10.1.2.3 has "
        "been marked dead because the detector has missed too many heartbeats from it. This "
        "can happen when a \t(1) raylet crashes unexpectedly (OOM, etc.) \n\t(2) raylet has "
        "lagging heartbeats due to slow network or busy workload."
    )
    oom = "Task was killed due to the node running low on memory.\nMemory on the node was 31.2GB"
    gcs = ray_worker.global_worker.gcs_client
    publish_error_to_driver("node_died", lost, gcs)
    publish_error_to_driver("out_of_memory", oom, gcs)
    printed = ""
    deadline = time.monotonic() + 30
    while printed.count("cluster: ") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        printed += capfd.readouterr().err
    assert printed.splitlines() == [
        f"cluster: node {node[:12]} (10.1.2.3) was lost: Ray stopped hearing from it (the "
        "machine went away, or its raylet crashed or stalled)",
        "cluster: Task was killed due to the node running low on memory. (--verbose shows "
        "Ray's full message)",
    ]


def test_imports_wait_for_ray_on_a_thread_of_their_own():
    """ensure_ray imports what the stages need while ray.init waits for the node: a module not
    imported yet is imported on a thread; one that cannot be imported is left to the stage
    that needs it to report."""
    from launcher.raysession import import_in_background

    assert import_in_background(("json",)) is None  # already imported: no thread
    name = "email.mime.audio"  # a standard module nothing else here imports
    sys.modules.pop(name, None)
    thread = import_in_background((name, "no_such_module_here"))
    assert thread is not None and thread.name == "ftlaunch-imports"
    thread.join(timeout=60)
    assert name in sys.modules and "no_such_module_here" not in sys.modules
