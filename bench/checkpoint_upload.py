"""Step time around a checkpoint: uploaded in the background against uploaded before the next step.

    python -m bench.checkpoint_upload OUT.json [--repeats N]

One Ray Train worker (1 CPU) trains a GPT-2 of 6 layers x 512 wide (random weights, the tiny
tokenizer: about 19M parameters, so a checkpoint with its AdamW state is about 230 MB) on rows
of exactly 32 tokens, checkpointing every CHECKPOINT_EVERY steps to a `file://` URI: Ray Train's
upload is then a real copy through pyarrow, as to shared storage. The same recipe runs with
`checkpoint.async_upload: false` and `true`, the two sides alternating per repeat.

Every step is reported (log_every 1), so each metrics record is one step's wall time (its tokens
over its tokens/s). The window of the step after a checkpoint holds the checkpoint: writing the
local copy on both sides, and with the synchronous upload the copy to storage too. Figures per
side: the median step without a checkpoint (`steady_s`), the median step right after one
(`after_checkpoint_s`), and the stall: the extra time of the CHECKPOINT_WINDOW steps after each
checkpoint over as many steady steps (a background upload that slowed the steps after it shows
there). Ratios: async / sync of `after_checkpoint_s` and of the stall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import exact_length_texts, log, median, ratio, write_text_rows

STEPS = 40
CHECKPOINT_EVERY = 10
CHECKPOINT_WINDOW = 3
LENGTH, BATCH, ROWS = 32, 2, 200
WIDTH, LAYERS = 512, 6


def build_inputs(root: Path) -> tuple[Path, Path]:
    """The model directory and the training rows."""
    from transformers import AutoTokenizer

    from launcher.dev.tiny import build_tiny_model

    model = build_tiny_model(root / "model", "gpt2", width=WIDTH, layers=LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = write_text_rows(root / "train.jsonl", exact_length_texts(tokenizer, ROWS, LENGTH))
    return model, rows


def run_side(model: Path, rows: Path, storage: Path, background: bool) -> list[dict[str, Any]]:
    """One job; its metrics records."""
    from launcher.job import run
    from launcher.recipe import validate_data
    from launcher.rundir import read_metrics

    body = {
        "name": f"ckpt-{'async' if background else 'sync'}",
        "model": {"name_or_path": str(model)},
        "data": {"train": str(rows), "split": {"validation": 0.0}, "max_length": LENGTH},
        "train": {"max_steps": STEPS, "batch_size": BATCH, "lr": 1e-4, "log_every": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False},
        "checkpoint": {
            "storage_path": f"file://{storage}",
            "every": CHECKPOINT_EVERY,
            "keep": 1,
            "metric": None,
            "async_upload": background,
        },
    }
    summary = run(validate_data(body))
    assert summary["status"] == "succeeded", summary
    return read_metrics(summary["run_dir"])


def step_times(records: list[dict[str, Any]]) -> dict[int, float]:
    """step -> that step's wall time, from its report window."""
    out = {}
    for r in records:
        if "event" not in r and r.get("tokens_per_s") and r.get("tokens"):
            out[int(r["step"])] = float(r["tokens"]) / float(r["tokens_per_s"])
    return out


def side_figures(times: dict[int, float]) -> dict[str, Any]:
    """Steady and after-checkpoint step times, and the stall per checkpoint."""
    checkpoints = [s for s in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)]
    near = {c + i for c in checkpoints for i in range(1, CHECKPOINT_WINDOW + 1)}
    steady = median(t for s, t in times.items() if s not in near and s > 2)
    after = median(times[c + 1] for c in checkpoints if c + 1 in times)
    stalls = [
        sum(times[c + i] for i in range(1, CHECKPOINT_WINDOW + 1)) - CHECKPOINT_WINDOW * steady
        for c in checkpoints
        if all(c + i in times for i in range(1, CHECKPOINT_WINDOW + 1))
    ]
    return {"steady_s": steady, "after_checkpoint_s": after, "stall_s": median(stalls)}


def stored_checkpoint_mb(storage: Path) -> float:
    """Mean size of the checkpoints left in storage (the last one of each run)."""
    kept = [d for d in storage.glob("*/checkpoints/checkpoint_*") if d.is_dir()]
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in kept]
    return sum(sizes) / max(1, len(sizes)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ftlaunch-bench-ckpt-"))
    os.environ["FTLAUNCH_STAGING"] = str(root / "staging")  # the driver's files of URI runs
    model, rows = build_inputs(root)
    sides: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    for repeat in range(args.repeats):
        for name in ("sync", "async") if repeat % 2 == 0 else ("async", "sync"):
            log(f"repeat {repeat + 1}: {name} upload")
            times = step_times(run_side(model, rows, root / "storage", name == "async"))
            sides[name].append({**side_figures(times), "step_times_s": times})
    summary = {
        name: {
            key: median(r[key] for r in runs)
            for key in ("steady_s", "after_checkpoint_s", "stall_s")
        }
        for name, runs in sides.items()
    }
    checkpoint_mb = stored_checkpoint_mb(root / "storage")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "load_average": os.getloadavg(),
        "shape": {"width": WIDTH, "layers": LAYERS, "length": LENGTH, "batch": BATCH},
        "steps": STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "checkpoint_mb": round(checkpoint_mb, 1),
        "sides": summary,
        "after_checkpoint_async_over_sync": ratio(
            summary["async"]["after_checkpoint_s"], summary["sync"]["after_checkpoint_s"]
        ),
        "stall_async_over_sync": ratio(summary["async"]["stall_s"], summary["sync"]["stall_s"]),
        "runs": sides,
    }
    args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
