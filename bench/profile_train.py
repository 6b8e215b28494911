"""`python -m bench.profile_train [--steps N] [--seconds S]`: where an ftlaunch training
worker spends its time, sampled with py-spy from the outside.

Runs a tiny GPT-2 job (same settings as the throughput benchmark, more steps), attaches
`py-spy record` to the Ray Train worker once it is training, and sorts the samples of its
main thread into the per-step costs of the loop: the model's forward, backward and optimizer
step, Ray Data batch iteration and collation, the stop-flag poll, metric all-reduce and
ray.train.report. Prints a table and writes bench/results/profile-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from bench.common import log

# First match wins, checked against the whole stack (outermost first), so a frame deeper in
# the stack decides only when no earlier rule matched.
CATEGORIES = [
    ("stop-flag poll (ray.get on an actor, every step)", ("stop_requested",)),
    ("metrics all-reduce + ray.train.report", ("report (launcher/train_loop.py",)),
    ("Ray Data batch iteration + collate", ("iter_torch_batches", "ray/data/")),
    ("optimizer step (clip, AdamW, schedule)", ("step (launcher/strategies.py",)),
    ("backward", ("backward (launcher/strategies.py",)),
    ("forward + loss", ("objective", "compute_loss", "forward")),
]
OTHER = "other (the loop's own Python, logging)"


def worker_pid() -> int | None:
    """Our Ray Train worker: a descendant of this process (other Ray clusters on the machine
    have workers of the same name) whose title names the worker actor."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            return proc.pid
    return None


def wait_for_first_report(runs: Path, timeout: float = 900) -> None:
    """Until the run's metrics.jsonl has a training report: model built, loop running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.stat().st_size for p in runs.glob("*/metrics.jsonl")):
            return
        time.sleep(0.5)


def classify(stack: str) -> str:
    for name, needles in CATEGORIES:
        if any(n in stack for n in needles):
            return name
    return OTHER


def summarize(raw: Path) -> dict[str, float]:
    """Share of the training thread's samples per category, from py-spy's collapsed stacks."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "train_loop_per_worker" not in stack:
            continue  # Ray's own threads, not the training loop
        counts[classify(stack)] += int(n)
    total = sum(counts.values()) or 1
    names = [name for name, _ in CATEGORIES] + [OTHER]
    return {name: counts[name] / total for name in names} | {"samples": float(total)}


def main(argv: list[str] | None = None) -> int:
    from bench.common import exact_length_texts, write_text_rows
    from bench.train import TrainSpec, run_ftlaunch
    from launcher.dev.tiny import build_tiny_model
    from launcher.models import load_tokenizer
    from launcher.recipe import ModelConfig

    parser = argparse.ArgumentParser(prog="python -m bench.profile_train")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ftlaunch-profile-"))
    model = build_tiny_model(root / "tiny-gpt2", "gpt2")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model)))
    data = write_text_rows(
        root / "train.jsonl", exact_length_texts(tokenizer, args.steps * 8 + 64, 128)
    )
    spec = TrainSpec(
        label="profile",
        model={"name_or_path": str(model)},
        data=data,
        steps=args.steps,
        warmup=args.log_every,
        log_every=args.log_every,
        batch_size=8,
        length=128,
        cpus_per_worker=1,
    )
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_ftlaunch(spec, root / "runs")))
    job.start()
    wait_for_first_report(root / "runs")
    pid = worker_pid()
    if pid is None:
        log("no Ray Train worker found")
        return 1
    raw = root / "profile.txt"
    log(f"py-spy record on worker {pid} for {args.seconds} s")
    spy = subprocess.run(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(args.seconds),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--idle",  # waiting (on an actor, a barrier, the data queue) costs wall time too
            "--rate",
            "200",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if spy.returncode != 0:
        log(f"py-spy failed: {spy.stderr[-500:]}")
    job.join()
    shares = summarize(raw)
    out = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "steps": args.steps,
        "log_every": args.log_every,
        "tokens_per_s": result.get("tokens_per_s"),
        "shares": shares,
    }
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"profile-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| where the training thread's samples went | share |\n| --- | ---: |")
    for name, share in shares.items():
        if name != "samples":
            print(f"| {name} | {share:.1%} |")
    print(f"\n{int(shares['samples'])} samples; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
