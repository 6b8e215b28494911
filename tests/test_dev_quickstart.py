"""`make quickstart` runs `python -m launcher.dev.quickstart`: a real pretrained model that pip ships,
generated data, and a metric that clearly improves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_makefile_quickstart_runs_the_quickstart_module():
    text = (REPO / "Makefile").read_text()
    target = text.split("\nquickstart:", 1)[1].split("\n\n", 1)[0]
    assert "-m launcher.dev.quickstart" in target


def test_quickstart_data_is_generated_balanced_and_deterministic(tmp_path):
    from launcher.dev.quickstart import write_quickstart_data

    first = write_quickstart_data(tmp_path / "a")
    second = write_quickstart_data(tmp_path / "b")
    for split, path in first.items():
        assert path.read_text() == second[split].read_text()
    labels = [json.loads(line)["label"] for line in first["train"].read_text().splitlines()]
    assert len(labels) == 640 and abs(labels.count("positive") - labels.count("negative")) < 64


@pytest.mark.ray_job
@pytest.mark.slow
def test_quickstart_improves_accuracy_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "launcher.dev.quickstart"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"validation accuracy: before ([0-9.]+) -> after ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert after >= 0.9 and after - before >= 0.25
    run_dir = next((tmp_path / "runs").glob("quickstart-*"))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["accuracy"] >= 0.9
    assert (run_dir / "model" / "config.json").exists()
