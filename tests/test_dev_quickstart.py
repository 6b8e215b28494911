"""`make quickstart` runs `python -m launcher.dev.quickstart`: a real pretrained model that pip ships,
generated data, a metric that clearly improves, and a terminal that shows only ftlaunch's own
display (no Ray, Ray Data, DeepSpeed or transformers lines)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every line shape ftlaunch prints on a successful local run (notes, progress, final report),
# then the quickstart's own lines around it.
OWN_LINES = [
    r"",
    r"preparing data \(tokenizing once\)",
    r"rows: .+",
    r"(train|validation|test): [\d,]+ rows (dropped|truncated) .+",
    r"run directory: .+",
    r"resuming from .+",
    r"training for \d+ steps",
    r"trainable parameters: [\d,]+ of [\d,]+ \([\d.]+%\)",
    r"model: [\d,]+ weight\(s\) not in the checkpoint start from random values and are "
    r"trained by this run: .+",
    r"step \d+/\d+  .*",
    r"eval @ step \d+: .*",
    r"restarted from the checkpoint at step \d+",
    r"cluster: .+",
    r"exporting checkpoint_\d+ to .+",
    r"export: .+",
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
    # The batch stage's progress bar; off a terminal it is drawn once, when it ends.
    r"(evaluate|generate|score) [━╺╸ ]+ \d+/\d+ +[\d.]+ rows/s [\d:]+ ETA [\d:-]+",
    # The streamed data preparation's (large sources only).
    r"(count|prepare) [━╺╸ ]+ \d+/\d+ +[\d.]+ pieces/s [\d:]+ ETA [\d:-]+",
    r"wrote quickstart data to .+",
    r"validation \w+: before [\d.]+ -> after [\d.]+",
]
OWN = re.compile("|".join(f"(?:{shape})" for shape in OWN_LINES))


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
def test_quickstart_improves_accuracy_and_prints_only_ftlaunch_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "launcher.dev.quickstart"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    for line in output.splitlines():
        assert OWN.fullmatch(line), f"not one of ftlaunch's lines: {line!r}\n\n{output}"
    # transformers' load report is silenced; the new classification head is said in our words
    assert "not in the checkpoint start from random values" in done.stdout
    assert "classifier.weight" in done.stdout
    match = re.search(r"validation accuracy: before ([0-9.]+) -> after ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert after >= 0.9 and after - before >= 0.25
    run_dir = next((tmp_path / "runs").glob("quickstart-*"))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["accuracy"] >= 0.9
    assert (run_dir / "model" / "config.json").exists()
