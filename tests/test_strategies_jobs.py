"""Sharded strategies through the real job: DeepSpeed ZeRO-3 / FSDP2 with LoRA, on 2 Ray workers
and (FSDP) on one in-process worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import job_body, write_recipe

from launcher.job import run
from launcher.recipe import load_recipe
from launcher.rundir import read_metrics


def lora_recipe(tmp_path: Path, model: Path, files: dict, strategy: dict) -> Path:
    body = job_body(
        tmp_path,
        model,
        files,
        name=f"lora-{strategy['name']}",
        train={"max_steps": 8, "batch_size": 8, "lr": 1e-2, "log_every": 1},
        checkpoint={"metric": None},
        finetune={"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        strategy=strategy,
        evaluate={"metrics": ["loss", "perplexity"], "batch_size": 16},
    )
    return write_recipe(tmp_path, body)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [{"name": "deepspeed", "zero_stage": 3}, {"name": "fsdp"}],
    ids=["zero3", "fsdp"],
)
@pytest.mark.ray_job
def test_lora_adapter_is_complete_and_reloads(
    ray_session, tiny_gpt2, story_data, tmp_path, strategy
):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary = run(load_recipe(lora_recipe(tmp_path, tiny_gpt2, story_data, strategy)))
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "succeeded"
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert losses[-1] < losses[0]

    # The saved adapter is complete: every LoRA tensor non-empty with the right shape.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    assert lora and all(v.numel() > 0 for v in lora.values())
    width = 64
    for key, value in lora.items():
        assert 4 in value.shape, f"{key} has shape {tuple(value.shape)}, not rank 4"
        assert value.abs().sum() > 0 or "lora_B" in key
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B moved from zero
    assert (run_dir / "adapter").stat().st_size >= 0 and width

    # base + adapter gives the merged model's outputs.
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    batch = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(input_ids=batch).logits,
            merged(input_ids=batch).logits,
            rtol=1e-4,
            atol=1e-4,
        )
    assert json.loads((run_dir / "eval.json").read_text())["perplexity"] > 1


def test_one_cpu_fsdp_worker_trains_in_this_process_with_a_world_of_one(
    ray_session, tiny_gpt2, story_data, tmp_path, monkeypatch
):
    """A one-worker CPU FSDP job runs in the driver (no Ray Train worker) inside a gloo group
    of one rank, and leaves neither the group nor its rank variables."""
    import torch.distributed as dist
    from ray._private.state import actors

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    path = lora_recipe(tmp_path, tiny_gpt2, story_data, {"name": "fsdp"})
    recipe = load_recipe(path, ["scaling.num_workers=1", "train.max_steps=4"])
    known = set(actors())

    summary = run(recipe)

    assert summary["status"] == "succeeded" and summary["steps"] == 4
    started = {a["ActorClassName"] for i, a in actors().items() if i not in known}
    assert not {"RayTrainWorker", "TrainController"} & started, started
    assert not dist.is_initialized()
    assert "LOCAL_RANK" not in os.environ
    losses = [m["loss"] for m in read_metrics(Path(summary["run_dir"])) if "loss" in m]
    assert losses[-1] < losses[0]
    assert (Path(summary["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
