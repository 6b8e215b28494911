"""Whatever a recipe file holds, `ftlaunch validate` answers 0 or 2 and never crashes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import cli
from launcher.recipe import Recipe, RecipeError, dump_recipe, load_recipe, parse_yaml, validate_data

REPO = Path(__file__).resolve().parent.parent

SEEDS: list[dict[str, Any]] = [
    {"name": "demo", "model": {"name_or_path": "gpt2"}, "data": {"train": "t.jsonl"}},
    {
        "name": "tour",
        "model": {"name_or_path": "bert", "task": "classification", "labels": ["a", "b"]},
        "data": {
            "train": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl"}],
            "format": "classification",
            "split": {"validation": 0.2, "test": 0.1},
        },
        "finetune": {"method": "lora", "lora": {"r": 4, "target_modules": ["query"]}},
        "train": {"epochs": 2, "lr": 3e-4, "eval_every": 10, "adversarial": {"epsilon": 0.5}},
        "strategy": {"name": "ddp", "mixed_precision": "no"},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "checkpoint": {"every": 5, "metric": "eval_accuracy", "mode": "max"},
        "evaluate": {"metrics": ["accuracy", "f1"]},
        "cluster": {"target": "kuberay", "image": "img:1", "namespace": "ml"},
    },
    {
        "name": "ds",
        "model": {"name_or_path": "gpt2"},
        "data": {"train": "t.jsonl", "format": "instruction", "prompt_template": "{instruction}"},
        "distill": {"teacher": {"name_or_path": "big"}, "mode": "offline", "top_k": 8},
        "strategy": {"name": "deepspeed", "zero_stage": 3, "offload": "all"},
        "generate": {"prompts": "p.txt", "do_sample": True, "temperature": 0.7},
        "tracking": {"tensorboard": True, "wandb": {"project": "p"}},
    },
]
SEEDS += [yaml.safe_load(p.read_text()) for p in sorted((REPO / "recipes").glob("*.yaml"))]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**18, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["epoch", "ddp", "lora", "classification", "auto", "-1", "1e999", "0"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


DEEP = "deeply-nested-value"  # stands in for a nested value, spliced into the YAML text


@st.composite
def deep_nesting(draw) -> str:
    """YAML nested hundreds of levels deep (too deep for yaml.safe_dump to write): flow style,
    or block style indented further on each line."""
    depth = draw(st.integers(min_value=1, max_value=1200))
    leaf = draw(st.sampled_from(["1", "x", "null", "-1e9"]))
    if draw(st.booleans()):
        opening = "".join(draw(st.lists(st.sampled_from("[{"), min_size=depth, max_size=depth)))
        closing = "".join("]" if c == "[" else "}" for c in reversed(opening))
        return opening.replace("{", "{k: ") + leaf + closing
    return "\n" + "".join(" " * (i + 8) + "k:\n" for i in range(depth)) + " " * (depth + 8) + leaf


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in nested data (list positions included)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths(value, (*prefix, i))
    return out


def parent_of(data: Any, path: tuple) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


@st.composite
def mutated_recipe(draw) -> dict:
    data = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(SEEDS))))  # a fresh deep copy
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        targets = paths(data)
        if not targets:
            break
        path = draw(st.sampled_from(targets))
        parent, key = parent_of(data, path), path[-1]
        action = draw(st.sampled_from(["drop", "replace", "add", "nest"]))
        if action == "drop":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(values)
        elif action == "nest":
            parent[key] = DEEP
        elif isinstance(parent[key], dict):
            parent[key][draw(st.text(min_size=1, max_size=15))] = draw(values)
    return data


def render(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@st.composite
def recipe_text(draw) -> str:
    kind = draw(st.sampled_from(["mutated", "mutated", "corrupted", "random_yaml", "random_text"]))
    if kind == "mutated":
        text = render(draw(mutated_recipe()))
        while DEEP in text:
            text = text.replace(DEEP, draw(deep_nesting()), 1)
        return text
    if kind == "corrupted":
        text = render(draw(st.sampled_from(SEEDS)))
        at = draw(st.integers(min_value=0, max_value=len(text)))
        cut = draw(st.integers(min_value=0, max_value=5))
        return text[:at] + draw(st.text(max_size=6)) + text[at + cut :]
    if kind == "random_yaml":
        return render(draw(values))
    return draw(st.text(max_size=200))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_loader(path: Path) -> None:
    """The loader either returns a Recipe that survives a round trip, or raises RecipeError."""
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        return
    assert isinstance(recipe, Recipe)
    again = validate_data(parse_yaml(dump_recipe(recipe), "resolved.yaml").data)
    assert again == recipe


def check_cli(path: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", "--quiet", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ")


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(text=recipe_text())
def test_validate_never_crashes(workdir, text):
    path = workdir / "recipe.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_loader(path)
    check_cli(path)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_validate_never_crashes_on_bytes(workdir, raw):
    path = workdir / "raw.yaml"
    path.write_bytes(raw)
    check_loader(path)
    check_cli(path)


@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from(["train.lr", "data.train", "strategy", "model.labels", "x.y", "name"]),
    value=values,
)
def test_overrides_never_crash(workdir, path, value):
    recipe = workdir / "seed.yaml"
    recipe.write_text(render(SEEDS[0]), encoding="utf-8")
    flow = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    flow = flow.removesuffix("...").strip()
    result = CliRunner().invoke(cli, ["validate", "-q", str(recipe), "--set", f"{path}={flow}"])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
