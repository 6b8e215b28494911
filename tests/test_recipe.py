"""The recipe loader: schema, cross-field rules, located errors, base: and --set."""

from __future__ import annotations

import textwrap
import typing
from pathlib import Path

import pytest
import yaml
from helpers import MINIMAL_YAML

from launcher.metrics import METRICS_BY_TASK
from launcher.recipe import (
    MetricName,
    Problem,
    Recipe,
    RecipeError,
    check_rules,
    dump_recipe,
    has_validation,
    inapplicable_fields,
    load_recipe,
    parse_yaml,
    reported_metrics,
    resolved_dict,
    validate_data,
)

MINIMAL = MINIMAL_YAML

CLASSIFIER = """\
name: sentiment
model:
  name_or_path: bert
  task: classification
  labels: [negative, positive]
data:
  train: data/train.jsonl
  format: classification
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value.problems


def only_problem(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> Problem:
    problems = problems_of(tmp_path, text, overrides)
    assert len(problems) == 1, [p.render() for p in problems]
    return problems[0]


# ------------------------------------------------------------------------------ valid recipes


def test_minimal_recipe_gets_the_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.name == "demo"
    assert recipe.model.task == "causal_lm" and recipe.model.dtype == "auto"
    assert recipe.data.split.validation == 0.1 and recipe.data.max_length == 512
    assert recipe.finetune.method == "full" and recipe.finetune.lora.r == 8
    assert recipe.train.lr == 2.0e-5 and recipe.train.batch_size == 8
    assert recipe.train.eval_every == "epoch" and recipe.checkpoint.every == "epoch"
    assert recipe.strategy.name == "ddp" and recipe.strategy.zero_stage == 2
    assert recipe.scaling.num_workers == 1 and recipe.checkpoint.metric == "eval_loss"
    assert recipe.distill is None and recipe.evaluate is None and recipe.generate is None
    assert recipe.cluster.target == "local"


def test_exponent_without_a_dot_is_a_number_as_in_yaml_1_2(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "train:\n  lr: 3e-5\n  epochs: 1e1\n"))
    assert recipe.train.lr == pytest.approx(3e-5)
    assert recipe.train.epochs == 10


def test_classifier_recipe_is_valid(tmp_path):
    recipe = load_recipe(write(tmp_path, CLASSIFIER))
    assert recipe.model.labels == ["negative", "positive"]
    assert "eval_accuracy" in reported_metrics(recipe)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = MINIMAL + "train:\n  <<: {lr: 0.1, epochs: 3}\n  lr: 0.5\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.lr == 0.5 and recipe.train.epochs == 3


# ------------------------------------------------------------------------- error classes


def test_misspelt_key_names_line_field_and_did_you_mean(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "train:\n  lerning_rate: 3.0e-5\n")
    assert problem.path == "train.lerning_rate"
    assert problem.where == f"{tmp_path / 'recipe.yaml'}:7:3"
    assert "did you mean train.lr?" in problem.message
    assert "allowed here: epochs, max_steps, batch_size" in problem.message


def test_hugging_face_name_at_top_level_suggests_the_recipe_field(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "learning_rate: 0.1\n")
    assert problem.path == "learning_rate"
    assert "did you mean train.lr?" in problem.message
    assert "allowed here: base, name, model, data" in problem.message


def test_misspelt_key_inside_a_list_item(tmp_path):
    text = MINIMAL.replace("train: data/train.jsonl", "train:\n    - {pth: a.jsonl}")
    problems = problems_of(tmp_path, text)
    by_path = {p.path: p.message for p in problems}
    assert "did you mean data.train[0].path?" in by_path["data.train[0].pth"]
    assert by_path["data.train[0].path"].startswith("required field is missing")
    # "not a string" from the other member of `str | list` would only confuse.
    assert "data.train" not in by_path


def test_wrong_choice_lists_the_allowed_values(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "strategy:\n  name: ddpp\n")
    assert problem.path == "strategy.name"
    assert problem.where.endswith(":7:3")
    assert "'ddp', 'fsdp' or 'deepspeed'" in problem.message and "'ddpp'" in problem.message


def test_unknown_placement_names_the_field_and_both_choices(tmp_path):
    text = MINIMAL + "scaling:\n  num_workers: 2\n  placement: strict_spread\n"
    problem = only_problem(tmp_path, text)
    assert problem.path == "scaling.placement"
    assert "'pack' or 'spread'" in problem.message and "'strict_spread'" in problem.message


def test_wrong_type_says_what_was_expected(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "train:\n  batch_size: many\n")
    assert problem.path == "train.batch_size"
    assert "valid integer" in problem.message and "'many'" in problem.message


def test_section_given_as_a_scalar_lists_its_keys(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "train: 5\n")
    assert problem.path == "train"
    assert "must be a mapping with keys among epochs, max_steps" in problem.message
    assert "(got an int)" in problem.message


def test_missing_required_field_explains_the_field(tmp_path):
    problem = only_problem(tmp_path, "name: demo\nmodel: {task: causal_lm}\ndata: {train: a}\n")
    assert problem.path == "model.name_or_path"
    assert problem.where.endswith(":2:1")
    assert problem.message.startswith("required field is missing: Hugging Face hub id")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-1.0", "greater than 0"),
        (".inf", "finite number"),
        (".nan", "finite number"),
        ("1e400", "finite number"),
    ],
)
def test_out_of_range_numbers(tmp_path, value, fragment):
    problem = only_problem(tmp_path, MINIMAL + f"train:\n  lr: {value}\n")
    assert problem.path == "train.lr" and fragment in problem.message


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    problem = only_problem(tmp_path, "name: demo\nmodel: [gpt2\ndata: x\n")
    assert problem.where == f"{tmp_path / 'recipe.yaml'}:3:5"
    assert problem.message.startswith("YAML syntax error: expected ',' or ']'")
    assert "line 2, column 8" in problem.message


def test_tab_indentation_is_a_located_syntax_error(tmp_path):
    problem = only_problem(tmp_path, "name: demo\nmodel:\n\tname_or_path: gpt2\n")
    assert problem.where.endswith(":3:1") and "YAML syntax error" in problem.message


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "absent.yaml")
    assert info.value.render() == (
        f"invalid recipe {tmp_path / 'absent.yaml'}: 1 problem\n"
        f"  - {tmp_path / 'absent.yaml'}: file not found; give the path of a YAML recipe"
    )


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(RecipeError, match="is a directory; give the path of a YAML recipe file"):
        load_recipe(tmp_path)


def test_device_and_huge_files_are_refused_without_reading(tmp_path):
    with pytest.raises(RecipeError, match=r"not a regular file \(a device or pipe\?\)"):
        load_recipe("/dev/zero")
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as out:
        out.truncate(5 * 2**20)  # sparse: no disk used
    with pytest.raises(RecipeError, match="larger than 4 MiB; not a recipe"):
        load_recipe(huge)


def test_binary_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 1\); recipes are UTF-8 YAML"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("- name: demo\n- model: gpt2\n", "a list"),
        ("just a string\n", "a str"),
        ("42\n", "an int"),
        ("", "nothing (null)"),
        ("# only a comment\n", "nothing (null)"),
    ],
)
def test_recipe_that_is_not_a_mapping(tmp_path, text, got):
    problem = only_problem(tmp_path, text)
    assert problem.message == (
        f"a recipe is a mapping of sections (name:, model:, data:, ...); got {got}"
    )
    assert problem.where.startswith(str(tmp_path / "recipe.yaml"))


def test_python_object_tags_are_refused_by_the_safe_loader(tmp_path):
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    problem = only_problem(tmp_path, text)
    assert problem.where.endswith(":1:7")
    assert problem.message.startswith("Python object tags are not allowed")
    assert "plain mappings, lists, strings, numbers, booleans and null" in problem.message
    assert not marker.exists()


def test_unknown_custom_tag(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "train: !secret {lr: 1}\n")
    assert "the tag !secret is not allowed" in problem.message


def test_duplicate_keys_name_both_places(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "train:\n  lr: 0.1\n  lr: 0.2\n")
    path = tmp_path / "recipe.yaml"
    assert problem.path == "train.lr"
    assert problem.where == f"{path}:8:3"
    assert problem.message == f"duplicate key (first at {path}:7:3); keep one"


def test_deep_flow_nesting_is_refused_before_parsing(tmp_path):
    text = MINIMAL + "strategy:\n  deepspeed_config: " + "[" * 5000 + "]" * 5000 + "\n"
    problem = only_problem(tmp_path, text)
    assert problem.where == f"{tmp_path / 'recipe.yaml'}:7:221"
    assert problem.message == (
        "YAML nested more than 200 levels deep; a recipe is a few levels of sections"
    )


def test_deep_block_nesting_is_an_error_not_a_crash(tmp_path):
    text = MINIMAL + "".join(" " * i + "k:\n" for i in range(1000))
    problem = only_problem(tmp_path, text)
    assert problem.message == "YAML nested too deeply; a recipe is a few levels of sections"


def test_deeply_nested_override_value(tmp_path):
    problem = only_problem(tmp_path, MINIMAL, ("strategy.deepspeed_config=" + "[" * 300,))
    assert problem.path == "strategy.deepspeed_config"
    assert "nested more than 200 levels deep" in problem.message


def test_alias_bomb_is_refused_before_expanding(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    problem = only_problem(tmp_path, "\n".join(lines) + "\n")
    assert "expands to more than 100000 values" in problem.message


def test_self_referencing_alias(tmp_path):
    problem = only_problem(tmp_path, MINIMAL + "strategy: {deepspeed_config: &a {x: *a}}\n")
    assert "nested too deeply" in problem.message


# ---------------------------------------------------------------------- cross-field rules

RULES = [
    # (recipe addition, field path, message fragment)
    (
        "strategy: {zero_stage: 3}",
        "strategy.zero_stage",
        "only applies to strategy.name: deepspeed (got ddp)",
    ),
    (
        "strategy: {name: fsdp, deepspeed_config: {a: 1}}",
        "strategy.deepspeed_config",
        "only applies to strategy.name: deepspeed (got fsdp)",
    ),
    (
        "strategy: {offload: optimizer}",
        "strategy.offload",
        "only applies to strategy.name: deepspeed or fsdp (got ddp)",
    ),
    (
        "strategy: {name: deepspeed, zero_stage: 0, offload: all}",
        "strategy.offload",
        "needs zero_stage 1, 2 or 3",
    ),
    (
        "finetune: {lora: {r: 4}}",
        "finetune.lora",
        "only applies to finetune.method: lora or qlora (got full)",
    ),
    (
        "finetune: {method: lora, adapter: {reduction_factor: 4}}",
        "finetune.adapter",
        "only applies to finetune.method: adapter (got lora)",
    ),
    (
        "finetune: {method: lora, num_virtual_tokens: 4}",
        "finetune.num_virtual_tokens",
        "only applies to finetune.method: prefix or prompt (got lora)",
    ),
    (
        "finetune: {method: prompt, trainable_layers: 2}",
        "finetune.trainable_layers",
        "only applies to finetune.method: freeze (got prompt)",
    ),
    (
        "model: {name_or_path: gpt2, labels: [a, b]}",
        "model.labels",
        "only applies to model.task: classification (got causal_lm)",
    ),
    (
        "data: {train: t.jsonl, split: {validation: 0.6, test: 0.5}}",
        "data.split",
        "validation + test fractions must sum below 1 (got 0.6 + 0.5)",
    ),
    (
        "checkpoint: {metric: eval_accuracy}",
        "checkpoint.metric",
        "'eval_accuracy' is not reported by this run (model.task: causal_lm); choose one of "
        "eval_loss, eval_perplexity",
    ),
    (
        "data: {train: t.jsonl, split: {validation: 0}}",
        "checkpoint.metric",
        "'eval_loss' is not reported by this run",
    ),
    (
        "cluster: {address: 'http://head:8265'}",
        "cluster.address",
        "only applies to cluster.target: ray (got local)",
    ),
    ("cluster: {target: ray}", "cluster.address", "required for cluster.target: ray"),
    (
        "scaling: {placement: spread}",
        "scaling.placement",
        "only applies with scaling.num_workers above 1 (got 1)",
    ),
    (
        "data: {train: t.jsonl, format: classification}",
        "data.format",
        "classification data needs model.task: classification",
    ),
    (
        "generate: {do_sample: false, temperature: 0.7}",
        "generate.temperature",
        "only applies with generate.do_sample: true",
    ),
    (
        "evaluate: {metrics: [loss, accuracy]}",
        "evaluate.metrics",
        "accuracy is not a metric of model.task: causal_lm; allowed: exact_match, loss, perplexity",
    ),
]


@pytest.mark.parametrize(
    ("addition", "path", "fragment"), RULES, ids=[r[1] + ":" + r[2][:20] for r in RULES]
)
def test_cross_field_rule(tmp_path, addition, path, fragment):
    problems = problems_of(tmp_path, "name: demo\n" + _with_defaults(addition))
    matching = [p for p in problems if p.path == path]
    assert matching, [p.render() for p in problems]
    assert fragment in matching[0].message
    assert matching[0].where is not None and ":" in matching[0].where


def test_the_schema_names_exactly_the_metrics_some_task_computes():
    named = set(typing.get_args(MetricName))
    assert named == {m for metrics in METRICS_BY_TASK.values() for m in metrics}


def _with_defaults(addition: str) -> str:
    """The addition plus whichever of model/data it does not set itself."""
    text = addition + "\n"
    if not addition.startswith("model:"):
        text += "model: {name_or_path: gpt2}\n"
    if not addition.startswith("data:"):
        text += "data: {train: t.jsonl}\n"
    return text


def test_classification_needs_labels_and_classification_data(tmp_path):
    text = CLASSIFIER.replace("  labels: [negative, positive]\n", "").replace(
        "  format: classification\n", ""
    )
    problems = problems_of(tmp_path, text)
    assert [(p.path, p.message) for p in problems] == [
        ("model.labels", "required for model.task: classification (label names in id order)"),
        ("data.format", "must be classification for model.task: classification (got text)"),
    ]


def test_generation_is_only_for_causal_lm(tmp_path):
    problem = only_problem(tmp_path, CLASSIFIER + "generate: {max_new_tokens: 8}\n")
    assert problem.path == "generate"
    assert problem.message == "generation needs model.task: causal_lm"


@pytest.mark.parametrize(
    ("addition", "path", "fragment"),
    [
        ("train: {batch_size: 0}", "train.batch_size", "greater than 0"),
        ("train: {grad_accum: -2}", "train.grad_accum", "greater than 0"),
        ("train: {epochs: 0}", "train.epochs", "greater than 0"),
        ("train: {max_steps: 0}", "train.max_steps", "greater than 0"),
        (
            "train: {eval_every: 0}",
            "train.eval_every",
            "Input should be 'epoch' (got 0); or Input should be greater than 0",
        ),
        (
            "train: {eval_every: weekly}",
            "train.eval_every",
            "Input should be 'epoch' (got 'weekly')",
        ),
        (
            "checkpoint: {every: -5}",
            "checkpoint.every",
            "Input should be 'epoch' (got -5); or Input should be greater than 0",
        ),
        (
            "data: {train: t.jsonl, split: {validation: 1.0}}",
            "data.split.validation",
            "less than 1",
        ),
        (
            "data: {train: t.jsonl, split: {test: -0.1}}",
            "data.split.test",
            "greater than or equal to 0",
        ),
    ],
)
def test_counts_and_fractions_have_ranges(tmp_path, addition, path, fragment):
    problem = only_problem(tmp_path, "name: demo\n" + _with_defaults(addition))
    assert problem.path == path
    assert fragment in problem.message


def test_all_problems_are_reported_at_once_in_file_order(tmp_path):
    text = """\
        name: demo
        model:
          name_or_path: gpt2
          task: classification
        data:
          train: t.jsonl
          format: classification
        train:
          lerning_rate: 0.1
          epochs: 0
        strategy:
          name: ddpp
          zero_stage: 3
        checkpoint:
          metric: eval_acc
        """
    problems = problems_of(tmp_path, text)
    lines = [int(p.where.rsplit(":", 2)[1]) for p in problems]
    assert lines == sorted(lines)
    assert [p.path for p in problems] == [
        "model.labels",
        "train.lerning_rate",
        "train.epochs",
        "strategy.name",
        "checkpoint.metric",
    ]
    # Schema errors and cross-field rules together (model.labels, checkpoint.metric); the
    # zero_stage rule is left out because it would judge the default that replaced 'ddpp'.
    assert "did you mean train.lr?" in problems[1].message


def test_rule_problems_that_follow_from_a_schema_error_are_not_reported(tmp_path):
    # strategy.name is invalid, so "offload only applies to deepspeed or fsdp (got ddp)" would
    # describe the default that replaced it, not what the user wrote.
    problems = problems_of(tmp_path, MINIMAL + "strategy: {name: deep_speed, offload: all}\n")
    assert [p.path for p in problems] == ["strategy.name"]
    # Nor do metric rules judge the default task that replaced a rejected model.task.
    recipe = (
        "name: demo\nmodel: {name_or_path: gpt2, task: regression}\ndata: {train: t.jsonl}\n"
        "evaluate: {metrics: [accuracy, f1]}\ncheckpoint: {metric: eval_accuracy}\n"
    )
    assert [p.path for p in problems_of(tmp_path, recipe)] == ["model.task"]


def test_render_lists_every_problem_with_position(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, MINIMAL + "train: {lr: 0, epochs: 0}\n"))
    path = tmp_path / "recipe.yaml"
    assert info.value.render() == (
        f"invalid recipe {path}: 2 problems\n"
        f"  - {path}:6:9: train.lr: Input should be greater than 0 (got 0)\n"
        f"  - {path}:6:16: train.epochs: Input should be greater than 0 (got 0)"
    )


def test_inapplicable_fields_and_check_rules_directly():
    recipe = Recipe.model_validate(
        {"name": "x", "model": {"name_or_path": "m"}, "data": {"train": "t"}}
    )
    skipped = inapplicable_fields(recipe)
    assert "strategy.zero_stage" in skipped and "finetune.lora" in skipped
    assert "model.labels" in skipped and "cluster.address" in skipped
    assert check_rules(recipe) == []
    assert has_validation(recipe)


def test_validate_data_on_plain_data():
    data = {"name": "x", "model": {"name_or_path": "m"}, "data": {"train": "t"}}
    assert validate_data(data).name == "x"
    with pytest.raises(RecipeError) as info:
        validate_data({**data, "strategy": {"zero_stage": 1}})
    assert info.value.problems[0].path == "strategy.zero_stage"


# ---------------------------------------------------------------------------- base: inheritance


def test_base_is_resolved_relative_to_the_file_and_deep_merged(tmp_path):
    write(tmp_path, MINIMAL + "train:\n  lr: 0.1\n  epochs: 3\n", "shared/base.yaml")
    child = write(
        tmp_path,
        "base: ../shared/base.yaml\nname: child\ntrain:\n  lr: 0.5\n",
        "recipes/child.yaml",
    )
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.model.name_or_path == "gpt2"
    assert recipe.train.lr == 0.5 and recipe.train.epochs == 3
    assert "base" not in resolved_dict(recipe)


def test_base_chain_of_three_and_lists_replace(tmp_path):
    write(tmp_path, MINIMAL + "evaluate: {metrics: [loss, perplexity]}\n", "a.yaml")
    write(tmp_path, "base: a.yaml\ntrain: {epochs: 2}\n", "b.yaml")
    c = write(tmp_path, "base: b.yaml\nevaluate: {metrics: [loss]}\n", "c.yaml")
    recipe = load_recipe(c)
    assert recipe.train.epochs == 2
    assert recipe.evaluate.metrics == ["loss"]


def test_errors_in_a_base_point_into_the_base_file(tmp_path):
    write(tmp_path, MINIMAL + "train:\n  lr: -1.0\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\nname: child\n", "child.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    (problem,) = info.value.problems
    assert problem.path == "train.lr"
    assert problem.where == f"{tmp_path / 'base.yaml'}:7:3"


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "base: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    (problem,) = info.value.problems
    assert problem.path == "base"
    assert problem.where == f"{tmp_path / 'b.yaml'}:1:1"
    assert problem.message == (
        f"recipes extend each other in a cycle: {tmp_path / 'a.yaml'} -> "
        f"{tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}; break the cycle"
    )


def test_missing_base_names_the_resolved_path(tmp_path):
    problem = only_problem(tmp_path, "base: nowhere/base.yaml\n" + MINIMAL)
    assert problem.path == "base" and problem.where.endswith(":1:1")
    assert f"base recipe not found: {tmp_path / 'nowhere/base.yaml'}" in problem.message


@pytest.mark.parametrize(("value", "got"), [("[a, b]", "a list"), ("''", "an empty string")])
def test_base_must_be_a_path(tmp_path, value, got):
    problem = only_problem(tmp_path, f"base: {value}\n" + MINIMAL)
    assert problem.message == f"must be the path of another recipe file, got {got}"


# ------------------------------------------------------------------------------- --set overrides


def test_set_parses_values_as_yaml(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        ["train.lr=3e-5", "train.max_steps=7", "strategy.name=deepspeed", "model.task=causal_lm"],
    )
    assert recipe.train.lr == pytest.approx(3e-5) and recipe.train.max_steps == 7
    assert recipe.strategy.name == "deepspeed"


def test_set_replaces_a_list(tmp_path):
    base = MINIMAL.replace("train: data/train.jsonl", "train: [{path: x.jsonl}, {path: y.jsonl}]")
    recipe = load_recipe(write(tmp_path, base), ["data.train=[{path: a.jsonl, weight: 2}]"])
    assert [(s.path, s.weight) for s in recipe.data.train] == [("a.jsonl", 2.0)]


def test_set_creates_missing_sections(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        [
            "distill.teacher.name_or_path=big",
            "strategy.name=deepspeed",
            "strategy.deepspeed_config.a.b=1",
        ],
    )
    assert recipe.distill.teacher.name_or_path == "big"
    assert recipe.strategy.deepspeed_config == {"a": {"b": 1}}


def test_set_errors_are_located_at_the_override(tmp_path):
    problem = only_problem(tmp_path, MINIMAL, ("train.lr=-1",))
    assert problem.where == "--set train.lr=-1" and "greater than 0" in problem.message
    # a section only the override created, judged as a whole by a cross-field rule
    problem = only_problem(tmp_path, MINIMAL, ("finetune.lora.r=8",))
    assert problem.path == "finetune.lora" and problem.where == "--set finetune.lora.r=8"


def test_set_unknown_path_suggests_and_lists_fields(tmp_path):
    problems = problems_of(tmp_path, MINIMAL, ("train.lerning_rate=1", "trian.lr=1"))
    assert [(p.path, p.where) for p in problems] == [
        ("train.lerning_rate", "--set train.lerning_rate=1"),
        ("trian.lr", "--set trian.lr=1"),
    ]
    assert "unknown field 'lerning_rate'; did you mean train.lr?" in problems[0].message
    assert "(allowed here: epochs, max_steps" in problems[0].message
    assert "unknown field 'trian'; did you mean train?" in problems[1].message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr", "expected KEY.PATH=VALUE, e.g. --set train.lr=3e-5"),
        ("=3", "empty key"),
        ("train..lr=3", "empty key"),
        (
            "train.lr.x=1",
            "train.lr is a value, not a section; set it as a whole: --set train.lr=VALUE",
        ),
        ("data.train.0.path=a", "data.train is a value, not a section"),
        ("train.lr=[1", "value is not valid YAML (expected ',' or ']'"),
        ("base=other.yaml", "cannot be overridden; edit the recipe file"),
    ],
)
def test_bad_overrides(tmp_path, override, fragment):
    problem = only_problem(tmp_path, MINIMAL, (override,))
    assert fragment in problem.message
    assert problem.where == f"--set {override}"


def test_set_empty_value_is_null(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "train: {max_steps: 5}\n"), ["train.max_steps="])
    assert recipe.train.max_steps is None


# ----------------------------------------------------------------------------- resolved output


def test_resolved_recipe_leaves_out_fields_that_do_nothing(tmp_path):
    data = resolved_dict(load_recipe(write(tmp_path, MINIMAL)))
    assert "zero_stage" not in data["strategy"] and "lora" not in data["finetune"]
    assert "labels" not in data["model"] and "address" not in data["cluster"]
    assert data["train"]["lr"] == 2.0e-5
    assert "placement" not in data["scaling"]  # one worker: nothing to place


def test_placement_is_pack_unless_set_and_kept_with_several_workers(tmp_path):
    path = write(tmp_path, MINIMAL + "scaling: {num_workers: 2}\n")
    assert resolved_dict(load_recipe(path))["scaling"]["placement"] == "pack"
    spread = load_recipe(path, ["scaling.placement=spread"])
    assert spread.scaling.placement == "spread"
    assert resolved_dict(spread)["scaling"]["placement"] == "spread"


@pytest.mark.parametrize(
    "addition",
    [
        "",
        "finetune: {method: lora, lora: {r: 4, target_modules: [c_attn]}}\nstrategy: {name: deepspeed, zero_stage: 3, offload: optimizer}",
        "distill: {teacher: {name_or_path: big}, mode: offline, top_k: 4}\ngenerate: {do_sample: true, top_p: 0.9}",
        "data:\n  train: [{path: a.jsonl, weight: 2}, {path: b.jsonl, name: b}]\n  format: instruction\n  prompt_template: 'Q: {instruction}'",
        "cluster: {target: kuberay, image: img, namespace: ml}\ntracking: {wandb: {project: p}}",
        "scaling: {num_workers: 2, placement: spread}",
    ],
)
def test_round_trip_of_the_resolved_recipe(tmp_path, addition):
    text = (
        MINIMAL + addition + "\n"
        if not addition.startswith("data:")
        else MINIMAL.split("data:")[0] + addition + "\n"
    )
    recipe = load_recipe(write(tmp_path, text))
    again = parse_yaml(dump_recipe(recipe), "resolved.yaml").data
    second = validate_data(again)
    assert second == recipe
    assert dump_recipe(second) == dump_recipe(recipe)


# ----------------------------------------------------------------------- elastic workers


@pytest.mark.parametrize(
    ("scaling", "train", "path", "words"),
    [
        ({"num_workers": [0, 2]}, {"max_failures": 1}, "scaling.num_workers", "min >= 1"),
        ({"num_workers": [3, 2]}, {"max_failures": 1}, "scaling.num_workers", "min <= max"),
        ({"num_workers": [1, 2, 3]}, {}, "scaling.num_workers", "[min, max]"),
        ({"num_workers": 0}, {}, "scaling.num_workers", "at least 1"),
        ({"num_workers": [1, 2]}, {}, "train.max_failures", "counts as a failure"),
        ({"num_workers": 2, "resize_interval_s": 5}, {}, "scaling.resize_interval_s", "elastic"),
        ({"num_workers": [1, 1], "placement": "spread"}, {}, "scaling.placement", "above 1"),
    ],
)
def test_bad_worker_ranges_are_refused(scaling, train, path, words):
    data = {
        "name": "elastic",
        "model": {"name_or_path": "gpt2"},
        "data": {"train": "train.jsonl"},
        "train": train,
        "scaling": scaling,
    }
    with pytest.raises(RecipeError) as caught:
        validate_data(data)
    assert any(p.path == path and words in p.message for p in caught.value.problems), [
        (p.path, p.message) for p in caught.value.problems
    ]


def test_an_elastic_range_is_valid_with_failures_allowed():
    recipe = validate_data(
        {
            "name": "elastic",
            "model": {"name_or_path": "gpt2"},
            "data": {"train": "train.jsonl"},
            "train": {"max_failures": -1},
            "scaling": {"num_workers": [2, 4], "resize_interval_s": 5, "placement": "spread"},
        }
    )
    s = recipe.scaling
    assert (s.min_workers, s.max_workers, s.elastic) == (2, 4, True)
    assert yaml.safe_load(dump_recipe(recipe))["scaling"]["num_workers"] == [2, 4]


def test_a_deepspeed_global_batch_cannot_hold_across_an_elastic_range():
    data = {
        "name": "elastic",
        "model": {"name_or_path": "gpt2"},
        "data": {"train": "train.jsonl"},
        "train": {"max_failures": 2, "batch_size": 4},
        "strategy": {"name": "deepspeed", "deepspeed_config": {"train_batch_size": 4}},
        "scaling": {"num_workers": [1, 2], "use_gpu": False},
    }
    with pytest.raises(RecipeError) as caught:
        validate_data(data)
    (problem,) = caught.value.problems
    assert "train_batch_size: 4 contradicts" in problem.message and "4 x 1 x 2" in problem.message
