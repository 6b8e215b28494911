"""`python -m bench.run [--quick] [--only NAME ...]`: ftlaunch against the plain libraries.

Seven measurements, each a ratio ftlaunch / baseline measured in the same run (see
bench/README.md). Writes bench/results/<date>-<host>.json and bench/results/latest.md and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    FULL,
    GPU,
    MINILM,
    QUICK,
    SMS_LABELS,
    SMS_SPAM_TRAIN,
    SST2_TRAIN,
    Sizes,
    exact_length_texts,
    log,
    long_enough_rows,
    smollm2_model,
    write_rows,
    write_text_rows,
)
from bench.hardware import Accelerator, detect

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = (
    "time_to_first_step",
    "train_tiny",
    "train_smollm2",
    "train_classification",
    "scaling",
    "scoring",
    "data",
    "memory",
)


def machine(accel: Accelerator) -> dict[str, Any]:
    import ray
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "gpus": torch.cuda.device_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "accelerator": accel.describe(),
        "load_start": round(os.getloadavg()[0], 1),
    }


class Workspace:
    """Models and data files the measurements share, built once per benchmark run."""

    def __init__(self, root: Path, sizes: Sizes, accel: Accelerator):
        from launcher.dev.tiny import build_tiny_model

        self.root = root
        self.sizes = sizes
        self.accel = accel
        self.tiny = build_tiny_model(
            root / "tiny-gpt2", "gpt2", width=sizes.train_width, layers=sizes.train_layers
        )
        self.memory_model = build_tiny_model(
            root / "gpt2-memory", "gpt2", width=sizes.memory_width, layers=4
        )
        rows = 2 * sizes.tiny_batch * max(sizes.tiny_steps, sizes.scaling_steps) + 64
        texts = exact_length_texts(self._tokenizer(), rows, sizes.tiny_length)
        self.tiny_data = write_text_rows(root / "tiny-train.jsonl", texts)
        self._smol_data: Path | None = None
        self._sms_data: Path | None = None

    def _tokenizer(self, model: dict[str, Any] | None = None):
        from launcher.models import load_tokenizer
        from launcher.recipe import ModelConfig

        return load_tokenizer(ModelConfig(**(model or {"name_or_path": str(self.tiny)})))

    def smol_data(self) -> Path:
        if self._smol_data is None:
            rows = self.sizes.smol_batch * self.sizes.smol_steps + 16
            texts = exact_length_texts(
                self._tokenizer(smollm2_model()), rows, self.sizes.smol_length
            )
            self._smol_data = write_text_rows(self.root / "smol-train.jsonl", texts)
        return self._smol_data

    def sms_data(self) -> Path:
        """SMS spam training rows long enough to fill cls_length tokens of MiniLM's tokenizer."""
        if self._sms_data is None:
            rows = long_enough_rows(self._tokenizer(MINILM), SMS_SPAM_TRAIN, self.sizes.cls_length)
            self._sms_data = write_rows(self.root / "sms-train.jsonl", rows)
        return self._sms_data


def tiny_spec(ws: Workspace):
    from bench.train import TrainSpec

    s = ws.sizes
    return TrainSpec(
        label=gpt2_label(s),
        model={"name_or_path": str(ws.tiny)},
        data=ws.tiny_data,
        steps=s.tiny_steps,
        warmup=s.tiny_warmup,
        log_every=s.tiny_log_every,
        batch_size=s.tiny_batch,
        length=s.tiny_length,
        cpus_per_worker=s.tiny_cpus,
        device=ws.accel.device,
    )


def classification_spec(ws: Workspace):
    from bench.train import TrainSpec

    s = ws.sizes
    return TrainSpec(
        label="minilm-sms-spam",
        model=dict(MINILM),
        data=ws.sms_data(),
        steps=s.cls_steps,
        warmup=s.cls_warmup,
        log_every=s.cls_log_every,
        batch_size=s.cls_batch,
        length=s.cls_length,
        lr=5e-5,
        cpus_per_worker=s.cls_cpus,
        device=ws.accel.device,
        task="classification",
        labels=SMS_LABELS,
    )


def gpt2_label(sizes: Sizes) -> str:
    return f"gpt2-{sizes.train_layers}x{sizes.train_width}"


def section_runners(ws: Workspace) -> dict[str, Callable[[], dict[str, Any]]]:
    from bench import train

    s = ws.sizes
    runs = ws.root / "runs"

    def smollm2() -> dict[str, Any]:
        spec = train.TrainSpec(
            label="smollm2-lora",
            model=smollm2_model(),
            data=ws.smol_data(),
            steps=s.smol_steps,
            warmup=s.smol_warmup,
            log_every=s.smol_log_every,
            batch_size=s.smol_batch,
            length=s.smol_length,
            lr=1e-4,
            lora=True,
            cpus_per_worker=s.smol_cpus,
            device=ws.accel.device,
        )
        return train.measure_throughput(spec, s.smol_repeats, runs, ws.accel)

    def scaling() -> dict[str, Any]:
        if ws.accel.device == "cuda" and ws.accel.count < 2:
            return {"skipped": "one GPU: scaling needs two"}
        spec = replace(tiny_spec(ws), steps=s.scaling_steps)
        return train.measure_scaling(spec, runs)

    def scoring() -> dict[str, Any]:
        from bench.scoring import measure_scoring, write_score_input

        data = write_score_input(ws.root / "score.jsonl", s.score_rows, SST2_TRAIN)
        return measure_scoring(
            ws.tiny, data, s.score_rows, s.repeats, ws.root / "scores", s.score_batch
        )

    def data() -> dict[str, Any]:
        import ray

        from bench.data_pipeline import measure_data

        ray.shutdown()  # the children start their own Ray; keep the cores for them
        return measure_data(
            SST2_TRAIN, ws.tiny, s.data_repeats, s.data_multiplier, ws.root / "data"
        )

    def memory() -> dict[str, Any]:
        from bench.memory import measure_memory

        return measure_memory(ws.memory_model, ws.root / "memory")

    return {
        "time_to_first_step": lambda: train.measure_time_to_first_step(
            tiny_spec(ws), s.ttfs_repeats, runs
        ),
        "train_tiny": lambda: train.measure_throughput(tiny_spec(ws), s.repeats, runs, ws.accel),
        "train_smollm2": smollm2,
        "train_classification": lambda: train.measure_throughput(
            classification_spec(ws), s.repeats, runs, ws.accel
        ),
        "scaling": scaling,
        "scoring": scoring,
        "data": data,
        "memory": memory,
    }


def run_sections(ws: Workspace, names: list[str]) -> dict[str, Any]:
    """Each section on its own: one that fails records its error and the rest still run."""
    runners = section_runners(ws)
    results: dict[str, Any] = {}
    for name in names:
        log(f"== {name}")
        started = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception as exc:  # a broken section must not hide the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.perf_counter() - started
        log(f"{name} took {results[name]['seconds']:.0f} s")
    return results


def write_results(result: dict[str, Any], out_dir: Path, full: bool = True) -> tuple[Path, Path]:
    """The JSON of every figure and the table: latest.md for a run of every section, a dated
    table beside the JSON for a run of some (--only)."""
    from bench.report import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"{stamp}-{result['host']}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path = out_dir / ("latest.md" if full else f"{stamp}-{result['host']}.md")
    md_path.write_text(markdown(result))
    return json_path, md_path


def choose_sizes(quick: bool, accel: Accelerator, repeats: int | None = None) -> tuple[Sizes, str]:
    """--quick shrinks everything; otherwise GPUs get the bigger GPU sizes. `repeats` (--repeats)
    sets how often each throughput pair runs, for a run with a time limit."""
    if quick:
        sizes, mode = QUICK, "quick"
    elif accel.device == "cuda":
        sizes, mode = GPU, "gpu"
    else:
        sizes, mode = FULL, "full"
    if repeats is not None:
        sizes = replace(sizes, repeats=repeats, smol_repeats=repeats)
    return sizes, mode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="throughput pairs per measurement"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accel = detect()
    sizes, mode = choose_sizes(args.quick, accel, args.repeats)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "mode": mode,
        "sizes": sizes.__dict__,
        "machine": machine(accel),
    }
    with tempfile.TemporaryDirectory(prefix="ftlaunch-bench-") as tmp:
        root = args.work or Path(tmp)
        log(f"building tiny models and data in {root}")
        ws = Workspace(root, sizes, accel)
        result["sections"] = run_sections(ws, list(args.only or SECTIONS))
    result["machine"]["load_end"] = round(os.getloadavg()[0], 1)
    result["seconds"] = time.perf_counter() - started
    json_path, md_path = write_results(result, args.out, full=not args.only)
    from bench.report import markdown

    print(markdown(result))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
