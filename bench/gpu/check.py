"""The GPU check behind bench/gpu/check.sh: kit install, GPU tests, two end-to-end jobs, the
GPU benchmark, one table and one JSON.

Every step runs under a time limit taken from one overall budget (default 330 s: with machine
start-up that leaves room for a rerun inside a 15-minute lease). Without CUDA (or with --cpu) the
GPU parts are skipped and the rest runs as it would on the device, so the script is tested here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from bench.gpu import kit

ROOT = kit.ROOT
DEFAULT_OUT = ROOT / "bench" / "results"
BUDGET_S = 330.0
# Seconds each step may take at most (the budget left caps them too); they add up to the budget.
STEP_LIMITS = {
    "install": 30.0,
    "gpu_tests": 120.0,  # DeepSpeed compiles its fused and CPU Adam at first use
    "submit_smollm2_lora": 55.0,
    "submit_gpt2_full": 50.0,
    "bench": 75.0,
}
LORA_STEPS = 300
FULL_STEPS = 200


@dataclass
class Step:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    out: Path
    work: Path
    kit_dir: Path
    gpu: bool
    deadline: float
    site: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def limit(self, name: str) -> float:
        return max(0.0, min(STEP_LIMITS[name], self.deadline - time.monotonic()))


def run_limited(cmd: list[str], ctx: Context, limit: float, log_name: str) -> int:
    """Run `cmd` in its own process group, output to OUT/logs/<log_name>.log; on time-out the
    whole group (Ray's processes too) is killed and 124 returned."""
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{log_name}.log").open("w") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=ctx.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return 124


def step_env(site: Path | None, gpu: bool) -> dict[str, str]:
    """The environment of every later step: the kit first on the path, libraries offline."""
    env = dict(os.environ)
    path = [str(site)] if site else []
    path += [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_TRAIN_V2_ENABLED="1",
        DS_ACCELERATOR="cuda" if gpu else "cpu",
    )
    return env


# ----------------------------------------------------------------------------------- steps


def install_kit(ctx: Context, step: Step) -> None:
    if not any(ctx.kit_dir.glob("*.whl")):
        step.status, step.detail = "failed", f"no wheels in {ctx.kit_dir}: run `make gpu-kit`"
        return
    site = ctx.work / "site"
    everything = os.environ.get("FTLAUNCH_KIT_INSTALL") == "all"
    summary = kit.install(ctx.kit_dir, site, everything=everything)
    ctx.site = site
    ctx.env = step_env(site, ctx.gpu)
    # This process builds the models and data of the later steps with launcher code too.
    sys.path.insert(0, str(site))
    step.status = "passed"
    step.figures = {
        "installed": len(summary["installed"]),
        "already_there": len(summary["skipped"]),
        "missing_too_big": summary["missing_too_big"],
    }
    step.detail = f"{len(summary['installed'])} wheels into {site}"


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def gpu_tests(ctx: Context, step: Step) -> None:
    xml = ctx.out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}"]
    rc = run_limited(cmd, ctx, ctx.limit("gpu_tests"), "gpu-tests")
    step.figures = junit_counts(xml)
    step.status = "passed" if rc == 0 else "failed"
    step.detail = "time limit" if rc == 124 else f"pytest exit {rc}"


def recipe_body(name: str, model: Path, train_file: Path, storage: Path, **overrides: Any) -> dict:
    """A one-worker recipe on packed rows; `overrides` update whole sections' keys."""
    body = {
        "name": name,
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train_file), "packing": True},
        "train": {"epochs": 4, "log_every": 20},
        "scaling": {"num_workers": 1, "use_gpu": "auto"},
        "checkpoint": {"storage_path": str(storage)},
    }
    for section, values in overrides.items():
        body.setdefault(section, {}).update(values)
    return body


def story_data(path: Path, lines: int) -> Path:
    from launcher.dev.synthetic import story_lines, write_jsonl

    return write_jsonl([{"text": t} for t in story_lines(lines, seed=3)], path)


def submit(ctx: Context, step: Step, body: dict) -> None:
    recipe = ctx.work / f"{body['name']}.yaml"
    recipe.write_text(json.dumps(body, indent=2))  # JSON is YAML
    cmd = [sys.executable, "-m", "launcher.cli", "submit", str(recipe)]
    rc = run_limited(cmd, ctx, ctx.limit(step.name), step.name)
    summaries = sorted(Path(body["checkpoint"]["storage_path"]).glob("*/summary.json"))
    summary = json.loads(summaries[-1].read_text()) if summaries else {}
    step.figures = {
        k: summary.get(k)
        for k in ("status", "steps", "tokens_per_s", "wall_time_s")
        if k in summary
    }
    step.status = "passed" if rc == 0 and summary.get("status") == "succeeded" else "failed"
    step.detail = "time limit" if rc == 124 else f"exit {rc}"
    if step.status == "passed":
        add_job_mfu(step, body)


def job_mfu(model_dir: Path, tokens_per_s: float | None, length: int, lora: bool, accel) -> Any:
    """MFU of an end-to-end job from its model's shape (built on the meta device: no weights),
    its tokens/s and its row length, as the benchmark computes it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.hardware import matmul_parameters, mfu, training_flops_per_token

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    flops = training_flops_per_token(
        matmul_parameters(model),
        config.num_hidden_layers,
        config.hidden_size,
        length,
        frozen_base=lora,
    )
    return mfu(tokens_per_s, flops, accel, 1)


def add_job_mfu(step: Step, body: dict) -> None:
    from bench.hardware import detect

    step.figures["mfu"] = job_mfu(
        Path(body["model"]["name_or_path"]),
        step.figures.get("tokens_per_s"),
        body["data"]["max_length"],
        body.get("finetune", {}).get("method") == "lora",
        detect(),
    )


def smollm2_model(ctx: Context) -> Path | None:
    """SmolLM2-135M with drawn weights from the kit's config and tokenizer (made once)."""
    assets = ctx.kit_dir / kit.SMOLLM2_DIR
    target = ctx.work / "smollm2-135m"
    if not (target / "config.json").exists() and assets.is_dir():
        kit.materialize_model(assets, target)
    return target if target.is_dir() else None


def submit_lora(ctx: Context, step: Step) -> None:
    model = smollm2_model(ctx)
    if model is None:
        step.status, step.detail = "failed", f"no {kit.SMOLLM2_DIR} in the kit"
        return
    data = story_data(ctx.work / "lora-train.jsonl", 40_000)
    submit(ctx, step, lora_body(model, data, ctx.work / "runs-lora"))


def lora_body(model: Path, train_file: Path, storage: Path) -> dict:
    return recipe_body(
        "gpu-smollm2-lora",
        model,
        train_file,
        storage,
        data={"max_length": 256},
        finetune={"method": "lora"},
        train={"max_steps": LORA_STEPS, "batch_size": 8, "lr": 2e-4},
        checkpoint={"every": LORA_STEPS},
    )


def submit_full(ctx: Context, step: Step) -> None:
    from launcher.dev.tiny import build_tiny_model

    # GPT-2 124M's shape (12 x 768) on the project's tiny tokenizer.
    model = build_tiny_model(ctx.work / "gpt2-12x768", "gpt2", width=768, layers=12)
    data = story_data(ctx.work / "full-train.jsonl", 40_000)
    submit(ctx, step, full_body(model, data, ctx.work / "runs-full"))


def full_body(model: Path, train_file: Path, storage: Path) -> dict:
    return recipe_body(
        "gpu-gpt2-full",
        model,
        train_file,
        storage,
        data={"max_length": 512},
        train={"max_steps": FULL_STEPS, "batch_size": 16, "lr": 3e-4, "epochs": 8},
        checkpoint={"every": FULL_STEPS},  # one checkpoint: a 124M model's takes seconds
    )


def bench_figures(result: dict[str, Any]) -> dict[str, Any]:
    """Ratio, tokens/s and MFU of each training section of a bench result."""
    figures: dict[str, Any] = {}
    for section, short in (("train_tiny", "gpt2"), ("train_smollm2", "smollm2_lora")):
        data = result.get("sections", {}).get(section, {})
        if "error" in data:
            figures[f"{short}_error"] = data["error"]
            continue
        for key in ("ratio", "ftlaunch_tokens_per_s", "plain_tokens_per_s", "ftlaunch_mfu"):
            if data.get(key) is not None:
                figures[f"{short}_{key}"] = data[key]
        if data.get("plain_mfu") is not None:
            figures[f"{short}_plain_mfu"] = data["plain_mfu"]
    return figures


def run_bench(ctx: Context, step: Step) -> None:
    model = smollm2_model(ctx)
    if model is not None:
        ctx.env["FTLAUNCH_BENCH_SMOLLM2"] = str(model)
    out = ctx.out / "bench"
    cmd = [sys.executable, "-m", "bench.run", "--only", "train_tiny", "train_smollm2"]
    cmd += ["--repeats", "1", "--out", str(out)]
    rc = run_limited(cmd, ctx, ctx.limit("bench"), "bench")
    results = sorted(out.glob("*.json"))
    result = json.loads(results[-1].read_text()) if results else {}
    step.figures = bench_figures(result)
    errors = [k for k in step.figures if k.endswith("_error")]
    step.status = "passed" if rc == 0 and result and not errors else "failed"
    step.detail = "time limit" if rc == 124 else f"exit {rc}, mode {result.get('mode')}"


GPU_ONLY = {"submit_smollm2_lora", "submit_gpt2_full", "bench"}
STEPS: list[tuple[str, Callable[[Context, Step], None]]] = [
    ("install", install_kit),
    ("gpu_tests", gpu_tests),
    ("submit_smollm2_lora", submit_lora),
    ("submit_gpt2_full", submit_full),
    ("bench", run_bench),
]


def run_steps(ctx: Context, only: list[str] | None = None) -> list[Step]:
    steps: list[Step] = []
    for name, action in STEPS:
        step = Step(name)
        steps.append(step)
        if only and name not in only:
            step.detail = "not asked for"
            continue
        if name in GPU_ONLY and not ctx.gpu:
            step.detail = "no CUDA GPU"
            continue
        if name != "install" and ctx.site is None:
            step.detail = "the kit is not installed"
            continue
        if ctx.limit(name) <= 0:
            step.detail = "time budget spent"
            continue
        started = time.monotonic()
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        try:
            action(ctx, step)
        except Exception as exc:  # one broken step must not hide the others' results
            step.status, step.detail = "failed", f"{type(exc).__name__}: {exc}"
        step.seconds = round(time.monotonic() - started, 1)
        print(f"[gpu-check] {name}: {step.status} ({step.seconds} s)", file=sys.stderr)
    return steps


def table(steps: list[Step]) -> str:
    lines = ["| step | result | seconds | detail | figures |", "| --- | --- | --- | --- | --- |"]
    for s in steps:
        figures = ", ".join(f"{k}={_short(v)}" for k, v in s.figures.items())
        lines.append(f"| {s.name} | {s.status} | {s.seconds:g} | {s.detail} | {figures} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu/check.sh", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="skip the GPU parts even with CUDA")
    parser.add_argument(
        "--kit", type=Path, default=Path(os.environ.get("FTLAUNCH_GPU_KIT", kit.KIT_DIR))
    )
    out = os.environ.get("OUT")
    parser.add_argument("--out", type=Path, default=Path(out) if out else DEFAULT_OUT)
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    parser.add_argument("--only", nargs="+", choices=[n for n, _ in STEPS], default=None)
    return parser.parse_args(argv)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = not args.cpu and cuda_available()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftlaunch-gpu-check-") as tmp:
        ctx = Context(args.out, Path(tmp), args.kit.resolve(), gpu, started + args.budget)
        steps = run_steps(ctx, args.only)
    failed = [s.name for s in steps if s.status == "failed"]
    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "mode": "gpu" if gpu else "cpu",
        "device": _device_name() if gpu else "cpu",
        "budget_s": args.budget,
        "seconds": round(time.monotonic() - started, 1),
        "ok": not failed,
        "steps": [asdict(s) for s in steps],
    }
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"gpu-check-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(steps))
    print(f"\n{report['mode']} mode, {report['seconds']} s; failed: {', '.join(failed) or 'none'}")
    print(f"wrote {path}")
    return 1 if failed else 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
