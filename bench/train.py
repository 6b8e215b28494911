"""Training throughput, time to first step and scaling: an ftlaunch run against a plain loop.

Both sides train the same model on the same rows (every row exactly `length` tokens, so no
padding and no shuffling difference matters), with the same batch, optimizer (AdamW, linear
schedule, gradient clipping at 1.0), dropout and torch thread count. ftlaunch's steady-state
tokens/s (samples/s for classification) comes from the run's own metrics.jsonl after the warm-up
steps; the plain loop times the same steps with perf_counter. Classification rows are all
exactly `length` tokens as well (texts at least that long, truncated), so no padding differs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import LLAMA_PROJECTIONS, log, median, ratio
from bench.hardware import Accelerator, matmul_parameters, mfu, training_flops_per_token


@dataclass(frozen=True)
class TrainSpec:
    """One training configuration, shared by the ftlaunch run and the plain loop."""

    label: str
    model: dict[str, Any]
    data: Path
    steps: int
    warmup: int
    log_every: int
    batch_size: int
    length: int
    lr: float = 1e-3
    lora: bool = False
    workers: int = 1
    cpus_per_worker: int = 2
    device: str = "cpu"  # "cuda": one GPU per worker, bf16 autocast on both sides
    task: str = "causal_lm"  # or "classification": rows carry a label, throughput in samples/s
    labels: tuple[str, ...] = ()  # classification: the label names, in id order

    @property
    def classification(self) -> bool:
        return self.task == "classification"

    @property
    def unit(self) -> str:
        """The throughput figure compared: samples/s for classification, else tokens/s."""
        return "samples_per_s" if self.classification else "tokens_per_s"


class TimedView:
    """A progress view for launcher.job.run that prints nothing and records when each driver
    event happened (perf_counter): the data notes, trainer start, model built, first report."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.reports: list[tuple[float, dict[str, Any]]] = []

    def start(self, total_steps: int) -> None:
        self.events.append((time.perf_counter(), "trainer_start"))

    def update(self, metrics: dict[str, Any]) -> None:
        self.reports.append((time.perf_counter(), dict(metrics)))

    def note(self, text: str) -> None:
        self.events.append((time.perf_counter(), text))

    def stop(self) -> None:
        self.events.append((time.perf_counter(), "trainer_stop"))

    def first(self, prefix: str) -> float | None:
        return next((t for t, text in self.events if text.startswith(prefix)), None)


# ------------------------------------------------------------------------------- ftlaunch


def recipe_body(spec: TrainSpec, storage: Path) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": f"bench-{spec.label}",
        "model": dict(spec.model),
        "data": {
            "train": str(spec.data),
            "split": {"validation": 0.0},
            "max_length": spec.length,
        },
        "train": {
            "epochs": 1,
            "max_steps": spec.steps,
            "batch_size": spec.batch_size,
            "lr": spec.lr,
            "log_every": spec.log_every,
            "seed": 0,
        },
        "scaling": {
            "num_workers": spec.workers,
            "cpus_per_worker": spec.cpus_per_worker,
            "use_gpu": spec.device == "cuda",
        },
        "checkpoint": {"storage_path": str(storage), "keep": 1},
    }
    if spec.classification:
        body["model"].update(task="classification", labels=list(spec.labels))
        body["data"]["format"] = "classification"
    if spec.lora:
        body["finetune"] = {
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LLAMA_PROJECTIONS},
        }
    return body


def steady_state(metrics: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Tokens, samples and seconds of the report windows after the warm-up steps."""
    windows = [m for m in metrics if m.get("tokens_per_s") and m.get("step", 0) > warmup]
    tokens = sum(float(m["tokens"]) for m in windows)
    spans = [float(m["tokens"]) / float(m["tokens_per_s"]) for m in windows]
    seconds = sum(spans)
    samples = sum(
        float(m.get("samples_per_s", 0.0)) * s for m, s in zip(windows, spans, strict=True)
    )
    return {
        "tokens": tokens,
        "samples": samples,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "samples_per_s": samples / seconds if seconds else None,
        "reports": len(windows),
    }


def run_ftlaunch(spec: TrainSpec, storage: Path) -> dict[str, Any]:
    """One `launcher.job.run` of the spec; steady-state tokens/s and the driver timeline."""
    from launcher.job import run
    from launcher.recipe import Recipe
    from launcher.rundir import read_metrics

    recipe = Recipe.model_validate(recipe_body(spec, storage))
    view = TimedView()
    started = time.perf_counter()
    error = None
    try:
        run_dir = Path(run(recipe, view=view)["run_dir"])
    except Exception as exc:
        # A stage after training (export, batch) can fail while the training figures are
        # complete: keep them and say what failed.
        run_dir = newest_run_dir(storage, recipe.name)
        if run_dir is None or not (run_dir / "metrics.jsonl").exists():
            raise
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        log(f"{spec.label}: the job failed after training ({error}); training figures kept")
    wall = time.perf_counter() - started
    metrics = [m for m in read_metrics(run_dir) if "event" not in m]
    out = {
        **steady_state(metrics, spec.warmup),
        "wall_s": wall,
        "final_loss": metrics[-1].get("loss") if metrics else None,
        "timeline": timeline(view, started),
        "job_error": error,
    }
    shutil.rmtree(run_dir, ignore_errors=True)  # exported models are large; keep the disk free
    return out


def newest_run_dir(storage: Path, name: str) -> Path | None:
    found = sorted(storage.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def timeline(view: TimedView, started: float) -> dict[str, float | None]:
    """Seconds from the call of run() to each observable driver event."""

    def since(t: float | None) -> float | None:
        return None if t is None else t - started

    return {
        "ray_and_tokenizer_ready": since(view.first("preparing data")),
        "data_ready": since(view.first("rows:")),
        "trainer_start": since(view.first("trainer_start")),
        "model_built": since(view.first("trainable parameters")),
        "first_report": since(view.reports[0][0] if view.reports else None),
        "trainer_stop": since(view.first("trainer_stop")),
    }


# ------------------------------------------------------------------------------ plain loop


def load_plain_model(model: dict[str, Any], labels: tuple[str, ...] = ()):
    """The model with transformers alone (GGUF dequantized on load), fp32; with `labels` a
    sequence classification head of that many classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.models import package_path

    source = model["name_or_path"]
    if source.startswith("pkg:"):
        source = str(package_path(source))
    kwargs: dict[str, Any] = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
    if not labels:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    kwargs.update(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32, **kwargs)


def load_plain_tokenizer(model: dict[str, Any]):
    from transformers import AutoTokenizer

    from launcher.models import package_path

    source = model["name_or_path"]
    if source.startswith("pkg:"):
        source = str(package_path(source))
    kwargs = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
    return AutoTokenizer.from_pretrained(source, **kwargs)


def plain_rows(spec: TrainSpec, tokenizer) -> Any:
    """The training rows as one (N, length) tensor: text + EOS, as ftlaunch tokenizes it."""
    import json

    import torch

    texts = [json.loads(line)["text"] for line in spec.data.read_text().splitlines() if line]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = [row + eos for row in tokenizer(texts)["input_ids"]]
    ids = [row for row in ids if len(row) == spec.length]
    return torch.tensor(ids, dtype=torch.long)


def plain_classification_rows(spec: TrainSpec, tokenizer) -> tuple[Any, Any]:
    """(ids, label ids): texts truncated to `length` with special tokens, as ftlaunch's
    classification format tokenizes them; rows shorter than `length` are left out."""
    import json

    import torch

    rows = [json.loads(line) for line in spec.data.read_text().splitlines() if line]
    encoded = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=spec.length, verbose=False
    )["input_ids"]
    ids = {name: i for i, name in enumerate(spec.labels)}
    kept = [
        (row, ids[r["label"]])
        for row, r in zip(encoded, rows, strict=True)
        if len(row) == spec.length
    ]
    return (
        torch.tensor([row for row, _ in kept], dtype=torch.long),
        torch.tensor([label for _, label in kept], dtype=torch.long),
    )


def plain_examples(spec: TrainSpec, tokenizer) -> tuple[Any, Any]:
    """(input ids, targets) of every training row: the labels of a classification row, the
    ids themselves for a causal LM."""
    if spec.classification:
        return plain_classification_rows(spec, tokenizer)
    rows = plain_rows(spec, tokenizer)
    return rows, rows


def run_plain(spec: TrainSpec, threads: int | None = None) -> dict[str, Any]:
    """The same steps with PyTorch + transformers (+ peft) only, timed from the outside."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    torch.set_num_threads(threads or spec.cpus_per_worker)
    device = torch.device(spec.device)
    # As ftlaunch's ddp does: fp32 weights, bf16 autocast on GPUs that have bf16.
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time what finished
        return time.perf_counter()

    marks = {"start": time.perf_counter()}
    torch.manual_seed(0)
    tokenizer = load_plain_tokenizer(spec.model)
    rows, targets = (t.to(device) for t in plain_examples(spec, tokenizer))
    marks["data_ready"] = now()
    model = load_plain_model(spec.model, spec.labels if spec.classification else ()).to(device)
    shape = model_shape(model)
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=LLAMA_PROJECTIONS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, spec.steps)
    marks["model_built"] = now()
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    mask = torch.ones(spec.batch_size, spec.length, dtype=torch.long, device=device)
    losses: list[float] = []
    steady_from = None
    for step in range(spec.steps):
        if step == spec.warmup:
            steady_from = now()
        start = (step * spec.batch_size) % (rows.shape[0] - spec.batch_size + 1)
        picked = order[start : start + spec.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=rows[picked], attention_mask=mask, labels=targets[picked])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step == 0:
            marks["first_step"] = now()
    ended = now()
    measured = spec.steps - spec.warmup
    seconds = ended - steady_from if steady_from else None
    samples = measured * spec.batch_size
    tokens = samples * spec.length
    return {
        "tokens": tokens,
        "samples": samples,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "samples_per_s": samples / seconds if seconds else None,
        "steps": measured,
        "final_loss": losses[-1] if losses else None,
        "timeline": {k: v - marks["start"] for k, v in marks.items() if k != "start"},
        "model_shape": shape,
    }


def model_shape(model) -> dict[str, int]:
    """Matmul parameters, layers and width: what training FLOPs depend on."""
    config = model.config
    return {
        "params": matmul_parameters(model),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def add_mfu(out: dict[str, Any], spec: TrainSpec, accel: Accelerator | None) -> None:
    """MFU of both sides on GPUs: the same FLOPs per token, each side's tokens/s."""
    shape = next((r.get("model_shape") for r in out["plain_runs"] if r.get("model_shape")), None)
    if accel is None or accel.device != "cuda" or shape is None or spec.classification:
        return
    flops = training_flops_per_token(
        shape["params"], shape["layers"], shape["hidden"], spec.length, frozen_base=spec.lora
    )
    out["flops_per_token"] = flops
    out["peak_tflops_per_gpu"] = accel.peak_tflops
    out["ftlaunch_mfu"] = mfu(out["ftlaunch_tokens_per_s"], flops, accel, spec.workers)
    out["plain_mfu"] = mfu(out["plain_tokens_per_s"], flops, accel, 1)


# ---------------------------------------------------------------------------- measurements


def measure_throughput(
    spec: TrainSpec, repeats: int, storage: Path, accel: Accelerator | None = None
) -> dict[str, Any]:
    """Steady-state tokens/s (samples/s for classification), ftlaunch and plain alternating,
    `repeats` times each; on GPUs also the model FLOPs utilisation of each. The ratio is the
    median of the pairs' ratios (each pair ran back to back, so load from elsewhere hits both
    sides of it alike); the per-side figures are each side's median."""
    ours, theirs = [], []
    for i in range(repeats):
        log(f"throughput {spec.label}: ftlaunch run {i + 1}/{repeats}")
        ours.append(run_ftlaunch(spec, storage))
        log(f"throughput {spec.label}: plain loop {i + 1}/{repeats}")
        theirs.append(run_plain(spec))
    unit = spec.unit
    a = median(r[unit] for r in ours)
    b = median(r[unit] for r in theirs)
    out = {
        "spec": describe(spec),
        "unit": unit,
        f"ftlaunch_{unit}": a,
        f"plain_{unit}": b,
        "ratio": median(ratio(x[unit], y[unit]) for x, y in zip(ours, theirs, strict=True)),
        "ratio_of_medians": ratio(a, b),
        "ftlaunch_runs": ours,
        "plain_runs": theirs,
    }
    add_mfu(out, spec, accel)
    return out


def measure_time_to_first_step(spec: TrainSpec, repeats: int, storage: Path) -> dict[str, Any]:
    """Seconds from the call to the first finished optimizer step, Ray start included.

    ftlaunch: launcher.job.run with log_every 1 after ray.shutdown(), so the first report
    marks step 1; the phases come from the driver's own progress events. Plain: tokenizer,
    data, model, optimizer and one step in this process (imports are warm on both sides).
    """
    import ray

    spec = replace(spec, steps=2, warmup=0, log_every=1)
    ours, theirs = [], []
    for i in range(repeats):
        log(f"time to first step: ftlaunch run {i + 1}/{repeats} (fresh Ray)")
        ray.shutdown()
        ours.append(run_ftlaunch(spec, storage)["timeline"])
        log(f"time to first step: plain loop {i + 1}/{repeats}")
        theirs.append(run_plain(spec)["timeline"])
    first = median(t["first_report"] for t in ours)
    plain_first = median(t["first_step"] for t in theirs)
    return {
        "spec": describe(spec),
        "ftlaunch_s": first,
        "plain_s": plain_first,
        "ratio": ratio(first, plain_first),
        "fixed_overhead_s": None if first is None else first - plain_first,
        "breakdown_s": overhead_breakdown(ours, theirs),
        "ftlaunch_runs": ours,
        "plain_runs": theirs,
    }


def overhead_breakdown(ours: list[dict], theirs: list[dict]) -> dict[str, float | None]:
    """Median seconds of each ftlaunch phase. Worker start and model build are one interval
    seen from the driver; the model build part is estimated by the plain loop's model build."""

    def phase(rows: list[dict], end: str, begin: str | None) -> float | None:
        values = [
            r[end] - (r[begin] if begin else 0.0)
            for r in rows
            if r.get(end) is not None and (begin is None or r.get(begin) is not None)
        ]
        return median(values)

    model_build = phase(theirs, "model_built", "data_ready")
    start_and_build = phase(ours, "model_built", "trainer_start")
    return {
        "ray_start_and_tokenizer": phase(ours, "ray_and_tokenizer_ready", None),
        "data_prep": phase(ours, "data_ready", "ray_and_tokenizer_ready"),
        "run_dir_and_plan": phase(ours, "trainer_start", "data_ready"),
        "worker_start_estimated": (
            None if start_and_build is None else start_and_build - (model_build or 0.0)
        ),
        "model_build_estimated": model_build,
        "first_step_and_report": phase(ours, "first_report", "model_built"),
        "plain_data": phase(theirs, "data_ready", None),
        "plain_model_build": model_build,
        "plain_first_step": phase(theirs, "first_step", "model_built"),
    }


def measure_scaling(spec: TrainSpec, storage: Path) -> dict[str, Any]:
    """1 worker vs 2 workers (1 CPU, or 1 GPU, each) on the same global batch and steps."""
    global_batch = spec.batch_size * 2
    one = replace(spec, label=f"{spec.label}-1w", workers=1, cpus_per_worker=1)
    one = replace(one, batch_size=global_batch)
    two = replace(spec, label=f"{spec.label}-2w", workers=2, cpus_per_worker=1)
    log(f"scaling: 1 worker x 1 {spec.device.upper()}")
    single = run_ftlaunch(one, storage)
    log(f"scaling: 2 workers x 1 {spec.device.upper()}")
    double = run_ftlaunch(two, storage)
    speedup = ratio(double["tokens_per_s"], single["tokens_per_s"])
    return {
        "spec": describe(two),
        "global_batch": global_batch,
        "one_worker_tokens_per_s": single["tokens_per_s"],
        "two_workers_tokens_per_s": double["tokens_per_s"],
        "speedup": speedup,
        "efficiency": None if speedup is None else speedup / 2,
        "runs": {"one": single, "two": double},
    }


def describe(spec: TrainSpec) -> dict[str, Any]:
    return {
        "label": spec.label,
        "model": spec.model,
        "steps": spec.steps,
        "warmup_steps": spec.warmup,
        "log_every": spec.log_every,
        "batch_size": spec.batch_size,
        "length": spec.length,
        "lora": spec.lora,
        "task": spec.task,
        "workers": spec.workers,
        "cpus_per_worker": spec.cpus_per_worker,
        "device": spec.device,
    }
