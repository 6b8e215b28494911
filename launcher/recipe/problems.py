"""What is wrong with a recipe and where: problems, the error carrying them, and their wording.

Every problem names the field (a dotted path), says what is wrong and what is allowed, and,
when known, the file:line:col (or `--set` override) it came from.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from launcher.errors import BadInputError
from launcher.recipe.schema import (
    all_paths,
    field_at,
    field_names,
    list_item_model,
    model_at,
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where it is, which field, what is wrong."""

    path: str
    message: str
    where: str | None = None

    def render(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        field = f"{self.path}: " if self.path else ""
        return f"{prefix}{field}{self.message}"


class RecipeError(BadInputError):
    """A recipe that cannot run; carries every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"invalid recipe {self.source}" if self.source else "invalid recipe"
        n = len(self.problems)
        lines = [f"{head}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p.render()}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class Doc:
    """A YAML document as plain data plus where each key came from."""

    data: Any
    marks: dict[tuple, str]


def describe(value: Any) -> str:
    """How a value reads in a message: a list, a mapping, an int, nothing (null)."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def dotted_path(loc: Sequence[Any]) -> str:
    """A location as a dotted path; list positions as [i]: data.train[0].path."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# Names other tools give recipe fields: a key spelt their way suggests ours.
ALIASES = {
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup_steps",
    "num_warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.scheduler",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "output_dir": "checkpoint.storage_path",
    "num_gpus": "scaling.num_workers",
    "zero_stage": "strategy.zero_stage",
    "lora_r": "finetune.lora.r",
    "lora_alpha": "finetune.lora.alpha",
    "lora_dropout": "finetune.lora.dropout",
}


def suggest(key: str, siblings: Iterable[str], parent: str = "") -> str | None:
    """A did-you-mean for a misspelt key: a nearby sibling, or a known alias anywhere."""
    siblings = list(siblings)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"{parent}{close[0]}"
    normal = key.lower().replace("-", "_")
    alias = difflib.get_close_matches(normal, list(ALIASES), n=1, cutoff=0.75)
    if alias:
        return ALIASES[alias[0]]
    paths = all_paths()
    leaves: dict[str, str] = {}
    for dotted in paths:
        leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    close = difflib.get_close_matches(normal, list(leaves), n=1, cutoff=0.75)
    if close:
        return leaves[close[0]]
    return None


def clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union-member tags from an error location, keeping real keys."""
    out: list = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif (isinstance(node, dict | list) or node is None) and (
            isinstance(part, str) and not _is_union_tag(part)
        ):
            # A key the data lacks (a missing field): keep real field names.
            out.append(part)
            node = None
        # a scalar: the rest are union tags
    return tuple(out)


def _is_union_tag(part: str) -> bool:
    return (
        any(ch in part for ch in "[]()")
        or part
        in (
            "str",
            "int",
            "float",
            "bool",
            "list",
            "dict",
        )
        or part.startswith(("literal", "function"))
    )


def mark_for(marks: dict[tuple, str], loc: tuple) -> str | None:
    """Where a location came from: its own mark, else the first key set inside it (a section
    that only --set created), else the nearest enclosing key's."""
    inside = [mark for key, mark in marks.items() if len(key) > len(loc) and key[: len(loc)] == loc]
    if loc not in marks and loc and inside:
        return inside[0]
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            return marks[loc[:end]]
    return None


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _message_for(err: Any, loc: tuple) -> str:
    """What is wrong at one pydantic error, and what is allowed there."""
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        model = model_at([str(p) for p in parent if isinstance(p, str)])
        if not model and any(isinstance(p, int) for p in parent):
            model = list_item_model(getattr(field_at(parent), "annotation", None))
        siblings = field_names(model) if model else []
        prefix = dotted_path(parent)
        hint = suggest(str(loc[-1]), siblings, f"{prefix}." if prefix else "")
        message = "unknown key" + (f"; did you mean {hint}?" if hint else "")
        return message + (f" (allowed here: {', '.join(siblings)})" if siblings else "")
    if kind == "missing":
        info = field_at(loc)
        help_text = f": {info.description}" if info is not None and info.description else ""
        return f"required field is missing{help_text}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = model_at([str(p) for p in loc if isinstance(p, str)])
        keys = f" with keys among {', '.join(field_names(model))}" if model else ""
        return f"must be a mapping{keys} (got {describe(err.get('input'))})"
    message = err["msg"].removeprefix("Value error, ")  # a validator's own words
    if "input" in err:
        message += f" (got {_shown(err['input'])})"
    return message


def problems_from_validation(exc: ValidationError, doc: Doc) -> list[Problem]:
    """One located problem per distinct pydantic error, union members joined per field."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = clean_loc(tuple(err["loc"]), doc.data)
        path, message = dotted_path(loc), _message_for(err, loc)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        problems.append(Problem(path, message, mark_for(doc.marks, loc)))
    return _merge_union_problems(_drop_wrong_union_members(problems))


def _drop_wrong_union_members(problems: list[Problem]) -> list[Problem]:
    """`str | list[...]` given a list: the errors inside the list matter, not 'not a string'."""
    return [
        p
        for p in problems
        if not (
            p.message.startswith("Input should be a valid")
            and any(q.path.startswith((p.path + ".", p.path + "[")) for q in problems)
        )
    ]


def _merge_union_problems(problems: list[Problem]) -> list[Problem]:
    """A union (e.g. 'epoch' | int) yields one error per member: join them per field."""
    index: dict[str, int] = {}
    out: list[Problem] = []
    for p in problems:
        if p.path in index and not p.message.startswith(("unknown key", "required")):
            prev = out[index[p.path]]
            out[index[p.path]] = Problem(p.path, f"{prev.message}; or {p.message}", prev.where)
        else:
            index[p.path] = len(out)
            out.append(p)
    return out


_POSITION = re.compile(r"^(?P<file>.*):(?P<line>\d+):(?P<col>\d+)$")


def _position_key(problem: Problem) -> tuple:
    """File positions first (by file, line, column), then --set overrides, then the rest."""
    where = problem.where or ""
    found = _POSITION.match(where)
    if found:
        return (0, found["file"], int(found["line"]), int(found["col"]))
    if where.startswith("--set"):
        return (1, "", 0, 0)
    return (2, "", 0, 0)


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Problems in the order a reader meets them in the file (stable for equal positions)."""
    return sorted(problems, key=_position_key)
