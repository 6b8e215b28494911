"""The recipe reference in README.md, generated from the schema so the two never drift.

python -m launcher.dev.reference            # print the reference
python -m launcher.dev.reference --write    # rewrite README.md's reference block
python -m launcher.dev.reference --check    # exit 1 when README.md's block is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from launcher.recipe import Recipe

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"
README = Path(__file__).resolve().parents[2] / "README.md"
WRITE_COMMAND = "python -m launcher.dev.reference --write"

Row = tuple[str, str, str, str]  # key, type, default, description


def render_reference() -> str:
    """Markdown: one table per recipe section (key, type, default, description)."""
    parts = [
        f"<!-- generated from launcher/recipe/schema.py by `{WRITE_COMMAND}`; do not edit -->",
        "",
        "Every key a recipe may hold. Unknown keys are errors, and so are keys that do nothing",
        "for the chosen method, strategy or task (the *description* says when a key applies).",
        "",
        "#### Top level",
        "",
        *_table(list(_rows(Recipe, "", top_level=True))),
    ]
    for name, info in Recipe.model_fields.items():
        section = _section(info.annotation)
        if section is None:
            continue
        optional = _allows_none(info.annotation)
        parts += ["", f"#### `{name}`{' (optional)' if optional else ''}", ""]
        parts += [_text(info.description or ""), ""]
        parts += _table(list(_rows(section, "")))
    return "\n".join(parts) + "\n"


def _rows(model: type[BaseModel], prefix: str, top_level: bool = False) -> Iterator[Row]:
    """Rows for a section's fields; nested sections become dotted keys (lora.r)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(info.annotation)
        if top_level and section is not None:
            continue
        if section is not None:
            if _allows_none(info.annotation):
                yield (key, "section or null", "`null`", _text(info.description or ""))
            yield from _rows(section, f"{key}.")
            continue
        yield (key, _type_name(info), _default(info), _text(info.description or ""))
        item = _list_item_section(info.annotation)
        if item is not None:
            yield from _rows(item, f"{key}[].")


def _table(rows: Sequence[Row]) -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {kind} | {default} | {text} |" for key, kind, default, text in rows]
    return lines


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section class of `Section` or `Section | None`."""
    candidates = [annotation, *typing.get_args(annotation)]
    found = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(found) != 1 or _list_item_section(annotation) is not None:
        return None
    return found[0]


def _list_item_section(annotation: Any) -> type[BaseModel] | None:
    """The section class of `list[Section]` inside an annotation (data sources)."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list:
            (item,) = typing.get_args(arg)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _type_name(info: FieldInfo) -> str:
    return _escape(_describe_type(info.annotation, info.metadata))


def _describe_type(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """`int > 0`, `epoch | int > 0`, `list of string`, `linear | cosine | constant`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _describe_type(args[0], [*metadata, *args[1:]])
    if origin in (typing.Union, types.UnionType):
        members = [_describe_type(a, metadata) for a in args if a is not type(None)]
        text = " or ".join(members)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return " | ".join(_plain(a) for a in args)
    if origin is list:
        item = args[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "list of mappings (keys below)"
        bounds = [b for b in (_bound(m) for m in metadata) if b]
        return " ".join([f"list of {_describe_type(item)}", *bounds])
    if origin is tuple:
        return "[" + ", ".join(_describe_type(a) for a in args) + "]"
    if origin is dict or annotation is dict:
        return "mapping"
    if isinstance(annotation, FieldInfo):  # Annotated[int, Field(gt=0)] as a union member
        return _describe_type(annotation.annotation, annotation.metadata)
    names = {str: "string", int: "int", float: "float", bool: "bool"}
    base = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = [b for b in (_bound(m) for m in metadata) if b]
    return f"{base} {' and '.join(bounds)}" if bounds else base


def _bound(meta: Any) -> str:
    if isinstance(meta, FieldInfo):
        return " ".join(b for b in (_bound(m) for m in meta.metadata) if b)
    for kind, attribute, symbol in (
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Ge, "ge", ">="),
        (annotated_types.Lt, "lt", "<"),
        (annotated_types.Le, "le", "<="),
    ):
        if isinstance(meta, kind):
            return f"{symbol} {_plain(getattr(meta, attribute))}"
    if isinstance(meta, annotated_types.MinLen) and meta.min_length:
        return "(non-empty)" if meta.min_length == 1 else f"(at least {meta.min_length})"
    return ""


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return _escape(f"`{_plain(value)}`")


def _plain(value: Any) -> str:
    """A value as a recipe would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list | dict):
        return json.dumps(value).replace('"', "")
    return str(value)


def _text(description: str) -> str:
    return _escape(" ".join(description.split()))


def _escape(text: str) -> str:
    """Table cells: a pipe ends the cell, angle brackets would read as HTML."""
    return re.sub(r"<(?=[A-Za-z/!])", "&lt;", text.replace("|", "\\|"))


def readme_block(readme: str) -> str | None:
    """What README.md holds between the markers (None when a marker is missing)."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        return None
    return readme[start + len(START) : end].strip("\n") + "\n"


def with_reference(readme: str, reference: str) -> str:
    """README text with the block between the markers replaced by `reference`."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {START} and {END}")
    return readme[: start + len(START)] + "\n" + reference + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.dev.reference", description=__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite README.md's block")
    action.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README, help="README file to use")
    args = parser.parse_args(argv)
    reference = render_reference()
    if not (args.write or args.check):
        sys.stdout.write(reference)
        return 0
    readme = args.readme.read_text(encoding="utf-8")
    if args.check:
        if readme_block(readme) == reference:
            return 0
        print(f"{args.readme}: recipe reference is stale; run `{WRITE_COMMAND}`", file=sys.stderr)
        return 1
    args.readme.write_text(with_reference(readme, reference), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
