"""Reading recipes: YAML with positions, `base:` inheritance, `--set` overrides, and dumping.

`load_recipe` reads a file (refusing files too large or too deeply nested to be recipes),
resolves the recipes it extends, applies overrides, validates the result, and reports every
problem at once with the file, line and column it came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from launcher.recipe.problems import (
    Doc,
    Problem,
    RecipeError,
    describe,
    dotted_path,
    sort_problems,
    suggest,
)
from launcher.recipe.rules import inapplicable_fields, validate_data
from launcher.recipe.schema import Recipe, field_names, section_type


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader (plain values only, no Python object tags), plus YAML 1.2 floats.

    PyYAML follows YAML 1.1, where `3e-5` (no dot) is a string; editors and JSON Schema tools
    read it as a number, and so do recipes.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_NODES = 100_000  # far above any real recipe; stops alias bombs before they expand


def _mark(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _walk_marks(root: yaml.Node, source: str, marks: dict[tuple, str]) -> list[Problem]:
    """Record file:line:col for every key and list item; report duplicate keys.

    Walks the composed node graph (before construction), so `<<:` merge keys are still visible:
    keys pulled in by a merge are not duplicates of the keys written next to them.
    """
    problems: list[Problem] = []
    visited = 0

    def walk(node: yaml.Node, path: tuple, from_merge: bool) -> None:
        nonlocal visited
        visited += 1
        if visited > MAX_YAML_NODES:
            raise RecipeError(
                [
                    Problem(
                        "", f"recipe expands to more than {MAX_YAML_NODES} values (YAML aliases?)"
                    )
                ],
                source,
            )
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                marks.setdefault((*path, i), _mark(source, item))
                walk(item, (*path, i), from_merge)
        elif isinstance(node, yaml.MappingNode):
            walk_mapping(node, path, from_merge)

    def walk_mapping(node: yaml.MappingNode, path: tuple, from_merge: bool) -> None:
        seen: dict[str, str] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merged += (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                walk(value_node, path, from_merge)
                continue
            key, where = key_node.value, _mark(source, key_node)
            if key in seen and not from_merge:
                problems.append(
                    Problem(
                        dotted_path((*path, key)),
                        f"duplicate key (first at {seen[key]}); keep one",
                        where,
                    )
                )
            seen[key] = where
            # Explicit keys win over merged ones, in the data and in the marks.
            if from_merge:
                marks.setdefault((*path, key), where)
            else:
                marks[(*path, key)] = where
            walk(value_node, (*path, key), from_merge)
        for source_node in merged:
            if isinstance(source_node, yaml.MappingNode):
                walk_mapping(source_node, path, True)

    marks[()] = _mark(source, root)
    walk(root, (), False)
    return problems


MAX_RECIPE_BYTES = 4 * 2**20  # recipes are a few kilobytes; data never goes inline


def _read_yaml(path: Path) -> Doc:
    source = str(path)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        exists = False
    if not exists:
        raise RecipeError(
            [Problem("", "file not found; give the path of a YAML recipe", source)], source
        )
    if path.is_dir():
        raise RecipeError(
            [Problem("", "is a directory; give the path of a YAML recipe file", source)], source
        )
    if not path.is_file():
        raise RecipeError(
            [
                Problem(
                    "", "not a regular file (a device or pipe?); give a YAML recipe file", source
                )
            ],
            source,
        )
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(
                [Problem("", f"larger than {MAX_RECIPE_BYTES // 2**20} MiB; not a recipe", source)],
                source,
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [Problem("", f"not UTF-8 text (byte {exc.start}); recipes are UTF-8 YAML", source)],
            source,
        ) from None
    except OSError as exc:
        raise RecipeError(
            [Problem("", f"cannot read the file: {exc.strerror or exc}", source)], source
        ) from None
    return parse_yaml(text, source)


def _yaml_error(exc: yaml.YAMLError, source: str) -> Problem:
    """One located problem for a YAML syntax error or a tag the safe loader refuses."""
    if isinstance(exc, yaml.reader.ReaderError):
        return Problem(
            "",
            f"character #x{exc.character:04x} is not allowed in YAML (at character "
            f"{exc.position}); recipes are printable UTF-8 text",
            source,
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return Problem("", f"YAML error: {exc}", source)
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = exc.problem or ""
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        tag = problem.rsplit("tag", 1)[-1].strip(" '")
        kind = "Python object tags are" if "python/" in tag else f"the tag {tag} is"
        return Problem(
            "",
            f"{kind} not allowed: recipes are loaded safely and hold plain mappings, lists, "
            "strings, numbers, booleans and null",
            where,
        )
    context = f" ({exc.context.strip()}" if exc.context else ""
    if context and exc.context_mark and exc.context_mark is not mark:
        context += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
    context += ")" if context else ""
    return Problem("", f"YAML syntax error: {problem}{context}", where)


MAX_FLOW_DEPTH = 200


def _too_deep(text: str, source: str) -> Problem | None:
    """Refuse absurdly nested [ { before parsing: PyYAML's scanner slows down with the square
    of the nesting depth, so a few kilobytes could otherwise stall `validate` for minutes."""
    depth, line, column = 0, 1, 0
    for char in text:
        column += 1
        if char == "\n":
            line, column = line + 1, 0
        elif char in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return Problem(
                    "",
                    f"YAML nested more than {MAX_FLOW_DEPTH} levels deep; "
                    "a recipe is a few levels of sections",
                    f"{source}:{line}:{column}",
                )
        elif char in "]}":
            depth = max(depth - 1, 0)
    return None


def parse_yaml(text: str, source: str) -> Doc:
    """Parse YAML safely, keeping the position of every key."""
    too_deep = _too_deep(text, source)
    if too_deep is not None:
        raise RecipeError([too_deep], source)
    loader = None
    marks: dict[tuple, str] = {}
    try:
        loader = _RecipeLoader(text)  # checks the characters first: may raise already
        node = loader.get_single_node()
        problems = _walk_marks(node, source, marks) if node is not None else []
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise RecipeError([_yaml_error(exc, source)], source) from None
    except RecursionError:
        raise RecipeError(
            [Problem("", "YAML nested too deeply; a recipe is a few levels of sections")], source
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "",
                    "a recipe is a mapping of sections (name:, model:, data:, ...); "
                    f"got {describe(data)}",
                    _mark(source, node) if node is not None else f"{source}:1:1",
                )
            ],
            source,
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        problems.append(
            Problem("", f"keys must be strings; got {bad[0]!r}", marks.get((bad[0],), source))
        )
    if problems:
        raise RecipeError(sort_problems(problems), source)
    return Doc(data, marks)


def _deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else in `over` replaces what `base` had."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _deep_merge(base.get(key), value) if key in base else value
        return merged
    return over


def _load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> Doc:
    """Read a recipe and, through `base:`, the recipes it extends (deep-merged, child wins)."""
    doc = _read_yaml(path)
    base_ref = doc.data.get("base")
    if base_ref is None:
        return doc
    where = doc.marks.get(("base",))
    base_path = _base_path(path, base_ref, where)
    chain = (*chain, _resolve(path))
    if _resolve(base_path) in chain:
        cycle = " -> ".join(str(p) for p in (*chain, _resolve(base_path)))
        raise RecipeError(
            [
                Problem(
                    "base", f"recipes extend each other in a cycle: {cycle}; break the cycle", where
                )
            ],
            str(path),
        )
    parent = _load_with_bases(base_path, chain)
    data = _deep_merge(parent.data, {k: v for k, v in doc.data.items() if k != "base"})
    marks = {**parent.marks, **doc.marks}
    marks.pop(("base",), None)
    return Doc(data, marks)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # unreadable or looping symlinks: compare as written
        return path.absolute()


def _base_path(path: Path, base_ref: Any, where: str | None) -> Path:
    """The file `base:` points at, relative to the recipe that names it."""
    problem = None
    if not isinstance(base_ref, str) or not base_ref.strip() or "\0" in base_ref:
        problem = f"must be the path of another recipe file, got {describe(base_ref)}"
    else:
        base_path = path.parent / base_ref
        try:
            if base_path.is_file():
                return base_path
            problem = f"base recipe not found: {base_path} (paths are relative to {path})"
        except OSError as exc:
            problem = f"cannot read base recipe {base_path}: {exc.strerror or exc}"
    raise RecipeError([Problem("base", problem, where)], str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML)."""
    where = f"--set {text}"
    if "=" not in text:
        raise RecipeError([Problem("", "expected KEY.PATH=VALUE, e.g. --set train.lr=3e-5", where)])
    key, raw = text.split("=", 1)
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise RecipeError(
            [Problem(key, "empty key; expected KEY.PATH=VALUE, e.g. --set train.lr=3e-5", where)]
        )
    too_deep = _too_deep(raw, where)
    if too_deep is not None:
        raise RecipeError([Problem(key, too_deep.message, where)])
    try:
        value = _parse_value(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            [
                Problem(
                    key,
                    f"value is not valid YAML ({problem}); quote it for the shell, "
                    "e.g. --set 'data.train=[{path: a.jsonl, weight: 2}]'",
                    where,
                )
            ]
        ) from None
    except RecursionError:
        raise RecipeError([Problem(key, "value nested too deeply", where)]) from None
    return parts, value


def _parse_value(raw: str) -> Any:
    if not raw.strip():
        return None
    loader = _RecipeLoader(raw)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


FREE_FORM = ("strategy.deepspeed_config",)  # mappings whose keys are not part of the schema


def _override_path_problem(parts: list[str], where: str) -> Problem | None:
    """Why `--set` cannot set this path, or None when the schema has it."""
    model: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if any(here == free or here.startswith(free + ".") for free in FREE_FORM):
            return None
        if model is None:
            return Problem(
                ".".join(parts),
                f"{here} is a value, not a section; set it as a whole: --set {here}=VALUE",
                where,
            )
        if part not in model.model_fields or part == "base":
            names = [n for n in field_names(model) if n != "base"]
            hint = suggest(part, names, f"{here}." if here else "")
            message = f"unknown field {part!r}"
            if part == "base":
                message = "cannot be overridden; edit the recipe file"
            elif hint:
                message += f"; did you mean {hint}?"
            return Problem(".".join(parts), f"{message} (allowed here: {', '.join(names)})", where)
        model = section_type(model.model_fields[part].annotation)
    return None


def apply_overrides(doc: Doc, overrides: Sequence[str]) -> None:
    """Apply `--set a.b.c=value` overrides in order, creating sections as needed.

    Raises RecipeError listing every override that names no field of the schema.
    """
    problems: list[Problem] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except RecipeError as exc:
            problems += exc.problems
            continue
        where = f"--set {text}"
        problem = _override_path_problem(parts, where)
        if problem is not None:
            problems.append(problem)
            continue
        node = doc.data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        # Marks below the overridden key described the file's old value: drop them.
        for loc in [loc for loc in doc.marks if loc[: len(parts)] == tuple(parts)]:
            del doc.marks[loc]
        doc.marks[tuple(parts)] = where
    if problems:
        raise RecipeError(problems)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file, resolve `base:` and `--set` overrides, and validate it.

    Raises RecipeError listing every problem, each with file:line:col and field path.
    """
    path = Path(path)
    doc = _load_with_bases(path)
    doc.data.pop("base", None)
    try:
        apply_overrides(doc, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None
    return validate_data(doc.data, doc, str(path))


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data: defaults filled in, fields that do nothing left out."""
    data = recipe.model_dump(mode="json", exclude={"base"})
    for dotted in inapplicable_fields(recipe):
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: exactly what runs."""
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False, allow_unicode=True, width=100)
