"""What a person sees: `submit` prints ftlaunch's own display and nothing from the libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import job_body, write_recipe

REPO = Path(__file__).resolve().parent.parent

# Every line shape ftlaunch prints on a successful local run: notes, progress, final report.
OWN_LINES = [
    r"",
    r"preparing data \(tokenizing once\)",
    r"rows: .+",
    r"run directory: .+",
    r"resuming from .+",
    r"training for \d+ steps",
    r"trainable parameters: [\d,]+ of [\d,]+ \([\d.]+%\)",
    r"step \d+/\d+  .*",
    r"eval @ step \d+: .*",
    r"restarted from the checkpoint at step \d+",
    r"exporting checkpoint_\d+ to .+",
    r"(per-source )?evaluation: .+",
    r"generations written to .+",
    r"warning: .+",
    r"run succeeded: .+",
    r"final metrics: .+",
    r"evaluation \w+: .+",
    r"steps: \d+, wall time: [\d.]+s",
    r"next:",
    r"  ftlaunch (eval|generate) .+",
    r"  python -c .+",
]
OWN = re.compile("|".join(f"(?:{shape})" for shape in OWN_LINES))


@pytest.mark.slow
def test_submit_prints_only_ftlaunch_lines(tiny_gpt2, story_data, tmp_path):
    body = job_body(
        tmp_path,
        tiny_gpt2,
        story_data,
        name="quiet",
        train={"max_steps": 4, "batch_size": 8, "log_every": 2},
    )
    body["scaling"]["num_workers"] = 1
    recipe = write_recipe(tmp_path, body)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "submit", str(recipe)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in output.splitlines():
        assert OWN.fullmatch(line), f"not one of ftlaunch's lines: {line!r}\n\n{output}"
