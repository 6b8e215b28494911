"""The README's commands are the code's commands: extracted from its code blocks and run.

`ftlaunch validate ...` and `ftlaunch render ...` lines run for real; every other `ftlaunch ...`
line must parse with the real CLI (verb, arguments, options), and the `make` targets must exist
and run what the guide says.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from launcher.cli import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def code_lines() -> list[str]:
    """Every non-empty line of every fenced code block, comments after # dropped."""
    lines = []
    for block in FENCE.findall(README.read_text(encoding="utf-8")):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def ftlaunch_commands() -> list[list[str]]:
    """`ftlaunch VERB ...` lines as argument lists (the part before a shell pipe); diagrams, whose
    box-drawing lines also start with `ftlaunch`, are not commands."""
    return [
        shlex.split(line.split(" | ")[0])[1:]
        for line in code_lines()
        if re.match(r"ftlaunch [a-z]", line) and not re.search("[\u2500-\u257f]", line)
    ]


COMMANDS = ftlaunch_commands()
VALIDATE = [c for c in COMMANDS if c[0] == "validate"]
RENDER = [c for c in COMMANDS if c[0] == "render"]
IDS = [" ".join(c) for c in COMMANDS]


def test_the_guide_shows_the_main_commands():
    verbs = {c[0] for c in COMMANDS}
    assert {"validate", "submit", "render", "eval", "generate", "score", "export"} <= verbs
    assert len(VALIDATE) >= 3 and any("--smoke" in c for c in VALIDATE)
    assert any("--address" in c for c in COMMANDS if c[0] == "submit")
    assert any("--resume" in c for c in COMMANDS if c[0] == "submit")
    assert "make quickstart" in code_lines()


@pytest.mark.parametrize("args", VALIDATE, ids=[" ".join(c) for c in VALIDATE])
def test_validate_commands_succeed(args, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FTLAUNCH_SMOKE_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["name"]


@pytest.mark.parametrize("args", RENDER, ids=[" ".join(c) for c in RENDER])
def test_render_commands_write_manifests(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    output = args[args.index("-o") + 1] if "-o" in args else None
    text = (tmp_path / output).read_text() if output else result.stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(text) if doc]
    assert "RayJob" in kinds and "ConfigMap" in kinds


def resolve(args: list[str]) -> tuple[click.Command, list[str], str]:
    """The click command a command line reaches, with its remaining arguments."""
    command: click.Command = cli
    name = "ftlaunch"
    while isinstance(command, click.Group):
        assert args, f"{name}: a subcommand is missing"
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{name} has no command {args[0]!r}"
        command, name, args = sub, f"{name} {args[0]}", args[1:]
    return command, args, name


@pytest.mark.parametrize("args", COMMANDS, ids=IDS)
def test_every_command_parses_with_the_real_cli(args):
    command, rest, name = resolve(args)
    # Parsing checks the verb, every option and the argument count, without running anything.
    ctx = command.make_context(name, list(rest), resilient_parsing=False)
    assert ctx.params is not None
    for word in rest:
        if word.startswith("recipes/"):
            assert (REPO / word).exists(), f"{word} named in README does not exist"


def test_make_targets_exist_and_run_what_the_guide_says():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    for line in code_lines():
        if line.startswith("make "):
            assert line.split()[1] in targets, f"README runs `{line}`, Makefile lacks it"
    quickstart = re.search(r"^quickstart:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert quickstart and "-m launcher.dev.quickstart" in quickstart.group(1)


def test_links_to_files_in_the_repository_resolve():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (REPO / target).exists(), f"README links to missing {target}"
