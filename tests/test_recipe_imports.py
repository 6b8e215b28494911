"""`ftlaunch validate` and `ftlaunch schema` stay light: no torch, Ray, DeepSpeed or transformers.

Checking a recipe must be quick on a laptop without a GPU stack, so each command runs in a fresh
interpreter that then lists the heavy packages it imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import MINIMAL_YAML

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "deepspeed", "transformers")

# Runs the CLI with the given arguments, then exits 3 naming any heavy package it imported,
# else with the CLI's own exit code.
RUN_AND_CHECK = textwrap.dedent(
    f"""
    import contextlib, io, sys
    from launcher.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(sys.argv[1:])
    heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
    if heavy:
        print("imported: " + ", ".join(heavy), file=sys.stderr)
        sys.exit(3)
    sys.exit(code)
    """
)

# Raw DeepSpeed keys are checked against the recipe at validation time; one of them
# contradicts train.batch_size, so the check and the error path both run.
DEEPSPEED = MINIMAL_YAML + textwrap.dedent(
    """\
    strategy:
      name: deepspeed
      zero_stage: 3
      deepspeed_config:
        train_micro_batch_size_per_gpu: 99
        zero_optimization: {stage3_max_live_parameters: 1000}
    """
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_AND_CHECK, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("validate", "recipes/quickstart.yaml"), 0),
        (("validate", "recipes/quickstart.yaml", "--format", "json"), 0),
        (("schema",), 0),
    ],
    ids=["validate", "validate-json", "schema"],
)
def test_light_commands_import_no_heavy_package(args, expected):
    result = run_cli(*args)
    assert result.returncode == expected, result.stderr


def test_validating_deepspeed_overrides_imports_no_heavy_package(tmp_path):
    recipe = tmp_path / "deepspeed.yaml"
    recipe.write_text(DEEPSPEED, encoding="utf-8")
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "train_micro_batch_size_per_gpu: 99 contradicts train.batch_size" in result.stderr
