"""`ftlaunch validate` and `ftlaunch schema`: exit codes, messages, round trip, JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from helpers import MINIMAL_YAML

from launcher.cli import cli, main
from launcher.recipe import load_recipe, parse_yaml, resolved_dict

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = MINIMAL_YAML

# Every section of the contract, each with non-default values that apply together.
FULL = """\
name: full-tour
model:
  name_or_path: gpt2
  task: causal_lm
  dtype: float32
data:
  train:
    - {path: a.jsonl, weight: 3}
    - {path: hf:tatsu-lab/alpaca:train, weight: 1, name: alpaca}
  validation: v.jsonl
  format: instruction
  instruction_fields: {instruction: q, input: ctx, output: a}
  prompt_template: "Q: {instruction}\\n{input}\\nA: "
  max_length: 256
finetune:
  method: lora
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [c_attn]}
distill:
  teacher: {name_or_path: gpt2-large}
  temperature: 1.5
  alpha: 0.3
train:
  epochs: 2
  max_steps: 100
  batch_size: 4
  grad_accum: 2
  lr: 3e-4
  scheduler: cosine
  eval_every: 20
strategy:
  name: deepspeed
  zero_stage: 3
  offload: optimizer
  deepspeed_config: {zero_optimization: {stage3_max_live_parameters: 1000}}
scaling: {num_workers: 2, use_gpu: false, cpus_per_worker: 1}
checkpoint: {every: 50, keep: 1, metric: eval_perplexity, mode: min}
evaluate: {metrics: [loss, perplexity, exact_match]}
generate: {prompts: prompts.txt, max_new_tokens: 16, do_sample: true, top_p: 0.9}
tracking: {tensorboard: true, mlflow: {experiment: tour}}
cluster: {target: ray, address: "http://head:8265"}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run(*args: str):
    """Run the CLI in-process; an exception escaping it would be a crash, never allowed."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: invalid recipe")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ----------------------------------------------------------------------------------- valid


def test_validate_prints_the_resolved_recipe(tmp_path):
    result = run("validate", write(tmp_path, MINIMAL))
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 2.0e-5 and printed["strategy"]["name"] == "ddp"
    assert "zero_stage" not in printed["strategy"]


def test_validate_quiet_prints_nothing(tmp_path):
    result = run("validate", "--quiet", write(tmp_path, MINIMAL))
    assert result.exit_code == 0 and result.output == ""


def test_validate_json_format(tmp_path):
    result = run("validate", "--format", "json", write(tmp_path, FULL))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["strategy"] == {
        "name": "deepspeed",
        "zero_stage": 3,
        "offload": "optimizer",
        "mixed_precision": "auto",
        "activation_checkpointing": False,
        "deepspeed_config": {"zero_optimization": {"stage3_max_live_parameters": 1000}},
    }
    assert printed["train"]["lr"] == 3e-4


def test_validate_applies_overrides(tmp_path):
    result = run(
        "validate",
        write(tmp_path, MINIMAL),
        "--set",
        "train.lr=3e-5",
        "--set",
        "data.train=[{path: a.jsonl, weight: 2}]",
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 3e-5
    assert printed["data"]["train"] == [{"path": "a.jsonl", "weight": 2.0, "name": None}]


@pytest.mark.parametrize("output_format", ["yaml", "json"])
@pytest.mark.parametrize("text", [MINIMAL, FULL], ids=["minimal", "full"])
def test_round_trip_through_the_printed_recipe(tmp_path, text, output_format):
    first = run("validate", "--format", output_format, write(tmp_path, text))
    assert first.exit_code == 0, first.output
    again = write(tmp_path, first.stdout, f"resolved.{output_format}")
    second = run("validate", "--format", output_format, again)
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert load_recipe(again) == load_recipe(tmp_path / "recipe.yaml")


def test_shipped_recipes_validate():
    assert SHIPPED, "recipes/*.yaml: at least the quickstart recipe ships"
    for path in SHIPPED:
        result = run("validate", "--quiet", path)
        assert result.exit_code == 0, f"{path.name}: {result.output}"


# ---------------------------------------------------------------------------- bad input


def test_misspelt_key(tmp_path):
    result = run("validate", write(tmp_path, MINIMAL + "train:\n  lerning_rate: 3e-5\n"))
    assert_bad_input(
        result,
        "recipe.yaml:7:3: train.lerning_rate: unknown key; did you mean train.lr?",
        "allowed here: epochs,",
    )


def test_several_problems_each_on_its_line(tmp_path):
    text = MINIMAL + "train:\n  epochs: 0\nstrategy:\n  name: ddp\n  zero_stage: 3\n"
    result = run("validate", write(tmp_path, text))
    assert_bad_input(result, "2 problems")
    lines = result.stderr.splitlines()
    assert lines[1].endswith(
        "recipe.yaml:7:3: train.epochs: Input should be greater than 0 (got 0)"
    )
    assert lines[2].endswith(
        "recipe.yaml:10:3: strategy.zero_stage: only applies to strategy.name: deepspeed "
        "(got ddp); remove it"
    )


def test_allowed_values_are_listed(tmp_path):
    result = run("validate", write(tmp_path, MINIMAL + "finetune: {method: qdora}\n"))
    assert_bad_input(
        result,
        "finetune.method: Input should be 'full', 'lora', 'qlora', 'adapter', 'prefix', "
        "'prompt', 'ia3', 'bitfit' or 'freeze' (got 'qdora')",
    )


def test_yaml_syntax_error(tmp_path):
    result = run("validate", write(tmp_path, "name: demo\nmodel: {name_or_path: gpt2\n"))
    assert_bad_input(result, "recipe.yaml:3:1: YAML syntax error")


def test_missing_file(tmp_path):
    result = run("validate", tmp_path / "absent.yaml")
    assert_bad_input(result, "absent.yaml: file not found")


@pytest.mark.parametrize("text", ["[1, 2]\n", "hello\n", "3.5\n", ""])
def test_recipe_that_is_a_list_or_scalar(tmp_path, text):
    result = run("validate", write(tmp_path, text))
    assert_bad_input(result, "a recipe is a mapping of sections (name:, model:, data:, ...); got")


def test_python_tag(tmp_path):
    result = run("validate", write(tmp_path, "name: !!python/name:os.system\n"))
    assert_bad_input(result, "recipe.yaml:1:7: Python object tags are not allowed")


def test_duplicate_key(tmp_path):
    result = run("validate", write(tmp_path, MINIMAL + "name: again\n"))
    assert_bad_input(result, "recipe.yaml:6:1: name: duplicate key (first at ")


def test_set_unknown_path(tmp_path):
    result = run("validate", write(tmp_path, MINIMAL), "--set", "train.lerning_rate=1")
    assert_bad_input(
        result,
        "--set train.lerning_rate=1: train.lerning_rate: unknown field 'lerning_rate'; "
        "did you mean train.lr?",
    )


def test_base_cycle(tmp_path):
    write(tmp_path, "base: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    result = run("validate", tmp_path / "a.yaml")
    assert_bad_input(result, "b.yaml:1:1: base: recipes extend each other in a cycle")


def test_deeply_nested_value(tmp_path):
    text = MINIMAL + "strategy:\n  deepspeed_config: {a: " + "[" * 20000 + "]" * 20000 + "}\n"
    result = run("validate", write(tmp_path, text))
    assert_bad_input(result, "recipe.yaml:7:224: YAML nested more than 200 levels deep")


def test_usage_errors_exit_2():
    result = run("validate")
    assert result.exit_code == 2 and "Missing argument 'RECIPE'" in result.output
    result = run("validate", "x.yaml", "--format", "toml")
    assert result.exit_code == 2 and "'toml' is not one of 'yaml', 'json'" in result.output


# ----------------------------------------------------------------- the real entry point


def ftlaunch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from launcher.cli import main; sys.exit(main())",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_entry_point_exit_codes(tmp_path):
    good = ftlaunch("validate", "-q", str(write(tmp_path, MINIMAL)))
    assert (good.returncode, good.stdout, good.stderr) == (0, "", "")
    bad = ftlaunch("validate", str(write(tmp_path, MINIMAL + "train: {lr: fast}\n", "bad.yaml")))
    assert bad.returncode == 2
    assert "bad.yaml:6:9: train.lr: Input should be a valid number" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


def test_main_returns_2_for_recipe_errors_and_usage(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert main(["validate", "--bogus"]) == 2
    assert main(["validate", "-q", str(write(tmp_path, MINIMAL))]) == 0
    assert main(["--version"]) == 0
    captured = capsys.readouterr()
    assert "file not found" in captured.err and "No such option '--bogus'" in captured.err


# ---------------------------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def recipe_schema() -> dict:
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_schema_is_draft_2020_12_with_descriptions(recipe_schema):
    assert recipe_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert recipe_schema["additionalProperties"] is False
    train = recipe_schema["$defs"]["TrainConfig"]["properties"]
    assert train["lr"]["description"] == "Peak learning rate of AdamW."
    assert train["lr"]["default"] == 2.0e-5


def test_schema_accepts_shipped_and_test_recipes(recipe_schema, tmp_path):
    validator = jsonschema.Draft202012Validator(recipe_schema)
    local = [write(tmp_path, MINIMAL, "minimal.yaml"), write(tmp_path, FULL, "full.yaml")]
    assert SHIPPED
    for path in [*SHIPPED, *local]:
        as_written = parse_yaml(path.read_text(), str(path)).data
        if "base" not in as_written:  # a recipe extending another may leave required keys out
            validator.validate(as_written)
        validator.validate(resolved_dict(load_recipe(path)))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"train": {"lerning_rate": 1}}, "Additional properties are not allowed ('lerning_rate'"),
        ({"strategy": {"name": "ddpp"}}, "'ddpp' is not one of ['ddp', 'fsdp', 'deepspeed']"),
        ({"train": {"batch_size": 0}}, "0 is less than or equal to the minimum of 0"),
        ({"name": None}, "None is not of type 'string'"),
    ],
)
def test_schema_rejects_broken_recipes(recipe_schema, change, fragment):
    data = yaml.safe_load(MINIMAL)
    for key, value in change.items():
        data[key] = value
    errors = [e.message for e in jsonschema.Draft202012Validator(recipe_schema).iter_errors(data)]
    assert any(fragment in message for message in errors), errors


def test_schema_requires_the_required_fields(recipe_schema):
    errors = list(jsonschema.Draft202012Validator(recipe_schema).iter_errors({"name": "x"}))
    assert sorted(e.message for e in errors) == [
        "'data' is a required property",
        "'model' is a required property",
    ]
