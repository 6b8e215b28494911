"""The README's recipe reference is generated from the schema and never drifts from it."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from launcher.dev.reference import (
    END,
    START,
    WRITE_COMMAND,
    main,
    readme_block,
    render_reference,
    with_reference,
)
from launcher.recipe import Recipe

README = Path(__file__).resolve().parent.parent / "README.md"


def section_of(annotation):
    """The section class in `Section`, `Section | None` or `list[Section]`, else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        for candidate in (arg, *typing.get_args(arg)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                return candidate, typing.get_origin(arg) is list
    return None, False


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf key of a section as the reference spells it (lora.r, train[].path)."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        section, in_list = section_of(info.annotation)
        if section is None or in_list:
            keys.add(f"{prefix}{name}")
        if section is not None:
            keys |= schema_keys(section, f"{prefix}{name}{'[]' if in_list else ''}.")
    return keys


def test_readme_reference_matches_the_schema():
    block = readme_block(README.read_text(encoding="utf-8"))
    assert block is not None, f"README.md lacks the markers {START} / {END}"
    assert block == render_reference(), (
        f"README.md's recipe reference is out of date with launcher/recipe/schema.py; "
        f"run `{WRITE_COMMAND}` and commit README.md"
    )


def test_every_schema_key_has_a_row():
    reference = render_reference()
    sections = 0
    for name, info in Recipe.model_fields.items():
        section, _ = section_of(info.annotation)
        if section is None:
            assert f"| `{name}` |" in reference.split("#### `model`")[0], name
            continue
        sections += 1
        body = reference.split(f"#### `{name}`", 1)[1].split("#### ", 1)[0]
        for key in schema_keys(section):
            assert f"| `{key}` |" in body, f"{name}.{key}"
    assert sections == 12 and reference.count("#### `") == sections


@pytest.mark.parametrize(
    "row",
    [
        "| `name` | string (non-empty) | **required** | Run name;",
        "| `lr` | float > 0 | `2e-05` | Peak learning rate of AdamW. |",
        "| `name` | ddp \\| fsdp \\| deepspeed | `ddp` | How the model is spread across workers. |",
        "| `eval_every` | epoch or int > 0 | `epoch` |",
        "| `split.validation` | float >= 0 and < 1 | `0.1` |",
        "| `max_steps` | int > 0 or null | `null` |",
        "| `metrics` | list of loss \\| perplexity \\| accuracy",
        "| `adversarial` | section or null | `null` |",
        "| `deepspeed_config` | mapping | `{}` |",
    ],
)
def test_rows_spell_types_defaults_and_descriptions(row):
    assert row in render_reference()


def test_html_like_text_is_escaped():
    reference = render_reference()
    assert "&lt;checkpoint.storage_path>/&lt;name>-&lt;timestamp>" in reference
    assert "<name>" not in reference


def test_write_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold text\n{END}\n\n## After\n", "utf-8")
    assert main(["--check", "--readme", str(readme)]) == 1
    assert main(["--write", "--readme", str(readme)]) == 0
    text = readme.read_text("utf-8")
    assert text.startswith("# Title\n\nintro\n\n" + START + "\n")
    assert text.endswith(END + "\n\n## After\n")
    assert "old text" not in text
    assert readme_block(text) == render_reference()
    assert main(["--check", "--readme", str(readme)]) == 0
    assert with_reference(text, render_reference()) == text


def test_check_tells_how_to_fix(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n", "utf-8")
    assert main(["--check", "--readme", str(readme)]) == 1
    assert WRITE_COMMAND in capsys.readouterr().err


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match=r"README\.md needs the markers"):
        with_reference("# no markers\n", "x\n")
