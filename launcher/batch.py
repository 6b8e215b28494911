"""Batch evaluation, generation and scoring with Ray Data.

One engine serves the three jobs. The driver reads the input in chunks (each row keeps its `id`,
or gets a `row_id`), validates every row where it can still name the file and line, and hands
the chunks to Ray Data. `map_batches` runs them through a pool of actors that each load the
model once (one actor per GPU when there are GPUs, CPU actors otherwise). Inside an actor the
rows of a call are sorted by token length and cut into model batches, so padding stays small;
results return in the row order of the call. The driver streams results to the output file as
they arrive, so memory stays flat however many rows there are.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher import metrics as M

ID_COLUMN = "id"
ROW_ID_COLUMN = "row_id"
INTERNAL_PREFIX = "_ftl_"
LABEL_ID = INTERNAL_PREFIX + "label_id"
# Model batches per actor call: rows are sorted by length within this window.
BUCKET_BATCHES = 8
# Input chunks put into Ray's object store: at most this many rows or (roughly) bytes each.
CHUNK_ROWS = 4096
CHUNK_BYTES = 4 * 2**20
INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")
CAUSAL_METRICS = {"loss", "perplexity", "exact_match"}
CLASSIFICATION_METRICS = {"loss", "accuracy", "precision", "recall", "f1"}


class BatchInputError(ValueError):
    """Bad input for a batch job (model reference, data file, option): the CLI exits with 2."""


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from and what it does, resolved once in the driver."""

    name_or_path: str
    task: str
    labels: tuple[str, ...] | None = None
    adapter: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False

    def model_config(self):
        from launcher.recipe import ModelConfig

        return ModelConfig(
            name_or_path=self.name_or_path,
            task=self.task,
            labels=list(self.labels) if self.labels else None,
            gguf_file=self.gguf_file,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )


def _task_from_architectures(architectures: Sequence[str] | None) -> str | None:
    for name in architectures or ():
        if name.endswith("ForSequenceClassification"):
            return "classification"
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
    return None


def _labels_from_config(config: dict) -> tuple[str, ...] | None:
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    return tuple(str(id2label[key]) for key in sorted(id2label, key=int))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(os.sep)


def _finish_source(
    where: str, name_or_path: str, config: dict, task: str | None, **extra: Any
) -> ModelSource:
    """Pick the task (given, or from the architectures) and the labels of a classifier."""
    task = task or _task_from_architectures(config.get("architectures"))
    if task is None:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise BatchInputError(
            f"cannot tell whether {where} is a causal LM or a classifier (architectures: "
            f"{archs}); pass task='causal_lm' or task='classification' (--task)"
        )
    if task not in ("causal_lm", "classification"):
        raise BatchInputError(f"task {task!r} is not allowed; choose causal_lm or classification")
    labels = extra.pop("labels", None)
    if task == "classification":
        labels = labels or _labels_from_config(config)
        if not labels or len(labels) < 2:
            raise BatchInputError(f"classification model {where} names fewer than two labels")
    return ModelSource(name_or_path, task, tuple(labels) if labels else None, **extra)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BatchInputError(f"cannot read {path}: {exc}") from None


def _resolve_run_dir(run: Path, task: str | None) -> ModelSource:
    recipe_model: dict = {}
    if (run / "recipe.yaml").exists():
        import yaml

        recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
        recipe_model = recipe.get("model") or {}
    task = task or recipe_model.get("task")
    labels = recipe_model.get("labels")
    common = {"trust_remote_code": bool(recipe_model.get("trust_remote_code", False))}
    if (run / "model" / "config.json").exists():
        config = _read_json(run / "model" / "config.json")
        return _finish_source(str(run), str(run / "model"), config, task, labels=labels, **common)
    if (run / "adapter").is_dir():
        base = recipe_model.get("name_or_path")
        if not base:
            raise BatchInputError(
                f"run directory {run} has adapter/ but no model.name_or_path in recipe.yaml "
                "to name the base model"
            )
        adapter_cfg = _read_json(run / "adapter" / "adapter_config.json")
        if task is None:
            peft_task = adapter_cfg.get("task_type")
            task = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(peft_task)
        config = {}
        if Path(base).is_dir() and (Path(base) / "config.json").exists():
            config = _read_json(Path(base) / "config.json")
        return _finish_source(
            str(run),
            base,
            config,
            task,
            labels=labels,
            adapter=str(run / "adapter"),
            gguf_file=recipe_model.get("gguf_file"),
            **common,
        )
    raise BatchInputError(
        f"run directory {run} has neither model/ nor adapter/ (did training finish exporting?)"
    )


def _resolve_hub_id(ref: str, task: str | None) -> ModelSource:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref).to_dict()
    except (OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BatchInputError(
            f"model {ref!r} is neither a local directory nor reachable on the Hugging Face "
            f"hub{offline}: {first}"
        ) from None
    return _finish_source(ref, ref, config, task)


def resolve_model(model_ref: str | Path, *, task: str | None = None) -> ModelSource:
    """Resolve a run directory, a model directory or a hub id to a ModelSource.

    A run directory means its model/ (consolidated), or the base model named in its recipe.yaml
    plus adapter/ when model/ is absent. The task comes from `task`, the recipe, or the model's
    architectures, in that order.
    """
    ref = str(model_ref)
    path = Path(os.path.expandvars(os.path.expanduser(ref)))
    if path.is_dir():
        if any((path / name).exists() for name in ("recipe.yaml", "model", "adapter")):
            return _resolve_run_dir(path, task)
        if (path / "config.json").exists():
            return _finish_source(str(path), str(path), _read_json(path / "config.json"), task)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _finish_source(
                str(path), str(path), {}, task or "causal_lm", gguf_file=ggufs[0].name
            )
        raise BatchInputError(
            f"{path} is neither a run directory (model/ or adapter/) nor a model directory "
            "(config.json)"
        )
    if path.exists() or _looks_like_path(ref):
        raise BatchInputError(f"model directory not found: {ref}")
    return _resolve_hub_id(ref, task)


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").exists()


def load_for_inference(source: ModelSource, device=None):
    """Load (model, tokenizer) for inference: eval mode, on `device`, adapter applied."""
    import torch

    from launcher.models import load_model, load_tokenizer, resolve_dtype

    device = device or torch.device("cpu")
    cfg = source.model_config()
    tokenizer_cfg = cfg
    if source.adapter and _has_tokenizer(Path(source.adapter)):
        tokenizer_cfg = cfg.model_copy(update={"name_or_path": source.adapter, "gguf_file": None})
    tokenizer = load_tokenizer(tokenizer_cfg)
    model = load_model(
        cfg, dtype=resolve_dtype(cfg.dtype, device), pad_token_id=tokenizer.pad_token_id
    )
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter)
    elif Path(cfg.name_or_path).is_dir():
        from launcher.export_layout import attach_exported_adapter

        # prefix / prompt / adapter exports keep their adapter in model/adapter.
        model = attach_exported_adapter(model, cfg.name_or_path)
    return model.to(device).eval(), tokenizer


def _max_positions(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 10**9:
        limits.append(model_max)
    return min(limits) if limits else 2048


# ------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings (the recipe's `generate:` section plus a seed)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides: Any) -> GenerationOptions:
        """From a GenerateConfig, a dict or None; `overrides` that are not None win."""
        values: dict[str, Any] = {}
        if cfg is not None:
            raw = cfg if isinstance(cfg, dict) else cfg.model_dump()
            values = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise BatchInputError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        opts = cls(**values)
        if opts.max_new_tokens <= 0 or opts.num_return_sequences <= 0:
            raise BatchInputError("max_new_tokens and num_return_sequences must be positive")
        if opts.temperature <= 0 or not 0 < opts.top_p <= 1:
            raise BatchInputError("temperature must be > 0 and top_p in (0, 1]")
        if opts.num_return_sequences > 1 and not opts.do_sample:
            raise BatchInputError(
                "num_return_sequences > 1 needs do_sample: true (greedy decoding returns one "
                "sequence per prompt)"
            )
        return opts


def check_template(template: str | None) -> None:
    """A prompt template must place the prompt somewhere."""
    if template is not None and "{prompt}" not in template and "{instruction}" not in template:
        raise BatchInputError(
            f"prompt template {template!r} must contain {{prompt}} (or {{instruction}}); "
            "{input} is optional"
        )


def apply_template(template: str | None, row: dict, instruction_format: bool = False) -> str:
    """The prompt text of a row: the template filled with {prompt}/{instruction} and {input}.

    With `instruction_format` the row is rendered exactly as the data stage rendered training
    prompts (its default template when `template` is None), so a fine-tuned instruction model
    sees the layout it learned. Placeholders are replaced literally: other braces stay.
    """
    prompt = str(row["prompt"])
    extra = row.get("input")
    extra = "" if extra is None else str(extra)
    if instruction_format:
        from launcher.data import render_prompt

        return render_prompt(template, prompt, extra)
    if not template:
        return prompt
    check_template(template)
    filled = template.replace("{prompt}", prompt).replace("{instruction}", prompt)
    return filled.replace("{input}", extra)


# ---------------------------------------------------------------------- per-batch model work


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into model batches of similar length (shortest first)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pad(sequences: Sequence[Sequence[int]], pad_value: int, side: str):
    """Stack sequences into (ids, attention mask) tensors, padded on `side`."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def token_logprobs(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """Log-probability of every scored token of each (input_ids, labels) row.

    Labels follow the Hugging Face convention: aligned with input_ids, -100 where a token is
    not scored; token t is predicted from tokens before it. Right padding keeps each row's
    positions as in an unpadded forward pass.
    """
    import torch
    import torch.nn.functional as F

    if max(len(r[0]) for r in rows) < 2:  # nothing to predict in any row
        return [np.zeros(0, dtype=np.float64) for _ in rows]
    ids, mask = _pad([r[0] for r in rows], pad_id, "right")
    labels, _ = _pad([r[1] for r in rows], -100, "right")
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    # Prompt tuning prepends virtual tokens; their logits come first.
    logits = logits[:, -ids.shape[1] :].float()
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    scored = targets != -100
    return [(-nll[i][scored[i]]).cpu().numpy().astype(np.float64) for i in range(len(rows))]


def class_probabilities(model, rows: Sequence[list[int]], pad_id: int, device) -> np.ndarray:
    """Softmax class probabilities, one row per input."""
    import torch

    ids, mask = _pad(rows, pad_id, "right")
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)


def generate_texts(
    model, tokenizer, prompts: Sequence[list[int]], opts: GenerationOptions, device, seed: int
) -> list[list[str]]:
    """Decode each prompt (left padded); num_return_sequences texts per prompt, EOS stops."""
    import torch

    ids, mask = _pad(prompts, tokenizer.pad_token_id, "left")
    kwargs: dict[str, Any] = {
        "max_new_tokens": opts.max_new_tokens,
        "do_sample": opts.do_sample,
        "num_return_sequences": opts.num_return_sequences,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if opts.do_sample:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new_tokens = out[:, ids.shape[1] :].cpu()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    n = opts.num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


# ------------------------------------------------------------------------------ the actor


def _pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_torch_threads() -> None:
    """Use the CPUs Ray assigned to this actor, not every core of the node."""
    import ray
    import torch

    if not ray.is_initialized():  # called directly, outside Ray: leave torch as it is
        return
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except AssertionError:  # Ray answers this only inside workers; the driver keeps its threads
        return
    torch.set_num_threads(max(1, int(cpus)))


class BatchWorker:
    """Ray Data actor: loads the model once, then runs one job kind on each pandas batch."""

    def __init__(self, source: ModelSource, job: dict):
        _set_torch_threads()
        self.device = _pick_device()
        self.model, self.tokenizer = load_for_inference(source, self.device)
        self.source = source
        self.job = job
        limit = _max_positions(self.model, self.tokenizer)
        self.max_length = min(job.get("max_length") or limit, limit)

    def __call__(self, batch):
        return JOB_KINDS[self.job["kind"]](self, batch)

    # Tokenization helpers shared by the job kinds.
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(str(text), add_special_tokens=special)["input_ids"]

    def encode_input(self, text: str) -> list[int]:
        """Token ids of a model input; an empty text becomes one BOS/EOS token, never nothing."""
        ids = self.encode(text)
        if ids:
            return ids
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [start if start is not None else tok.pad_token_id]

    def lm_rows(self, batch) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row: the text, or the completion given the prompt."""
        job = self.job
        rows = []
        if job.get("pairs"):
            for prompt, completion in zip(
                batch[job["prompt_field"]], batch[job["completion_field"]], strict=True
            ):
                p_ids = self.encode(prompt)
                c_ids = self.encode(completion, special=False)
                ids = (p_ids + c_ids)[: self.max_length]
                labels = ([-100] * len(p_ids) + c_ids)[: self.max_length]
                rows.append((ids, labels))
        else:
            for text in batch[job["text_field"]]:
                ids = self.encode(text)[: self.max_length]
                rows.append((ids, list(ids)))
        return rows

    def run_buckets(self, lengths: Sequence[int], fn: Callable[[np.ndarray], list]) -> list:
        """Call fn on length-sorted model batches; results come back in row order."""
        results: list = [None] * len(lengths)
        for bucket in length_buckets(lengths, self.job["batch_size"]):
            for index, value in zip(bucket, fn(bucket), strict=True):
                results[int(index)] = value
        return results


def _kept_columns(worker: BatchWorker, batch):
    """The input columns an output keeps: all of them, or only those the job carries."""
    if worker.job.get("keep_columns", True):
        return batch
    return batch[list(worker.job.get("carry", []))].copy()


def _lm_job(worker: BatchWorker, batch):
    """Per-row log-likelihood (sum, mean per token, count) and/or a generated output."""
    out = _kept_columns(worker, batch)
    if worker.job.get("nll", True):
        rows = worker.lm_rows(batch)
        pad = worker.tokenizer.pad_token_id
        logps = worker.run_buckets(
            [len(r[0]) for r in rows],
            lambda idx: token_logprobs(worker.model, [rows[i] for i in idx], pad, worker.device),
        )
        sums = [float(lp.sum()) for lp in logps]
        counts = [len(lp) for lp in logps]
        out["log_likelihood"] = sums
        out["num_tokens"] = counts
        out["log_likelihood_per_token"] = [
            s / c if c else None for s, c in zip(sums, counts, strict=True)
        ]
        if worker.job.get("token_logprobs"):
            out["token_logprobs"] = [lp.tolist() for lp in logps]
    if worker.job.get("generate"):
        out["output"] = _generate_first(worker, batch)
    return out


def _generate_first(worker: BatchWorker, batch) -> list[str]:
    """Greedy (or configured) first output per row, for exact-match evaluation."""
    return [texts[0] for texts in _generate_all(worker, batch)]


def _generate_all(worker: BatchWorker, batch) -> list[list[str]]:
    job = worker.job
    opts = GenerationOptions(**job["generate"])
    room = max(1, worker.max_length - opts.max_new_tokens)
    records = batch.to_dict("records")
    prompts = [
        worker.encode_input(
            apply_template(
                job.get("prompt_template"),
                {**r, "prompt": r[job["prompt_field"]]},
                job.get("instruction_format", False),
            )
        )[-room:]
        for r in records
    ]
    ids = [str(r.get(ID_COLUMN, r.get(ROW_ID_COLUMN, ""))) for r in records]

    def run(bucket: np.ndarray) -> list[list[str]]:
        seed = opts.seed + zlib.crc32(",".join(ids[i] for i in bucket).encode())
        return generate_texts(
            worker.model, worker.tokenizer, [prompts[i] for i in bucket], opts, worker.device, seed
        )

    return worker.run_buckets([len(p) for p in prompts], run)


def _generation_job(worker: BatchWorker, batch):
    """One output row per prompt and return sequence, with every input column kept."""
    import pandas as pd

    texts = _generate_all(worker, batch)
    n = worker.job["generate"]["num_return_sequences"]
    out = batch.loc[batch.index.repeat(n)].reset_index(drop=True)
    out["sequence_index"] = list(range(n)) * len(batch)
    out["output"] = [t for per_row in texts for t in per_row]
    return pd.DataFrame(out)


def _classification_job(worker: BatchWorker, batch):
    """Per-label probabilities, predicted label and, when labels are known, the row loss."""
    job = worker.job
    encoded = [worker.encode_input(t)[: worker.max_length] for t in batch[job["text_field"]]]
    pad = worker.tokenizer.pad_token_id
    probs = np.asarray(
        worker.run_buckets(
            [len(e) for e in encoded],
            lambda idx: list(
                class_probabilities(worker.model, [encoded[i] for i in idx], pad, worker.device)
            ),
        )
    )
    labels = worker.source.labels or ()
    out = _kept_columns(worker, batch)
    if job.get("keep_columns", True):
        for k, name in enumerate(labels):
            out[f"prob_{name}"] = probs[:, k]
    predicted = probs.argmax(axis=1)
    out["predicted_id"] = predicted
    out["predicted_label"] = [labels[p] if p < len(labels) else str(p) for p in predicted]
    if LABEL_ID in batch:
        truth = batch[LABEL_ID].to_numpy().astype(np.int64)
        out["row_loss"] = -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-45, None))
        out[LABEL_ID] = truth
    return out


def _tokenized_eval_job(worker: BatchWorker, batch):
    """Rows already tokenized by the data stage (input_ids, labels): loss statistics only."""
    import pandas as pd

    pad = worker.tokenizer.pad_token_id
    ids = [list(map(int, x)) for x in batch["input_ids"]]
    if worker.source.task == "classification":
        probs = np.asarray(
            worker.run_buckets(
                [len(x) for x in ids],
                lambda idx: list(
                    class_probabilities(worker.model, [ids[i] for i in idx], pad, worker.device)
                ),
            )
        )
        truth = batch["labels"].to_numpy().astype(np.int64)
        return pd.DataFrame(
            {
                "predicted_id": probs.argmax(axis=1),
                LABEL_ID: truth,
                "row_loss": -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-45, None)),
            }
        )
    rows = [(x, list(map(int, y))) for x, y in zip(ids, batch["labels"], strict=True)]
    logps = worker.run_buckets(
        [len(x) for x in ids],
        lambda idx: token_logprobs(worker.model, [rows[i] for i in idx], pad, worker.device),
    )
    return pd.DataFrame(
        {
            "log_likelihood": [float(lp.sum()) for lp in logps],
            "num_tokens": [len(lp) for lp in logps],
        }
    )


JOB_KINDS: dict[str, Callable] = {
    "lm": _lm_job,
    "generation": _generation_job,
    "classification": _classification_job,
    "tokenized_eval": _tokenized_eval_job,
}


# ------------------------------------------------------------------------------ reading input


def _input_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise BatchInputError(
            f"{path}: unsupported data file type {suffix or '(none)'}; allowed: "
            + ", ".join(INPUT_SUFFIXES)
        )
    return suffix


def iter_records(path: str | Path, text_column: str = "text") -> Iterator[tuple[str, dict]]:
    """(location, row) for every row of a data file; location reads "file, line N"."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"data file not found: {path}")
    suffix = _input_suffix(path)
    if suffix in (".jsonl", ".json"):
        yield from _iter_json(path)
    elif suffix == ".txt":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path}, line {number}", {text_column: line.rstrip("\n")}
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        import pyarrow.parquet as pq

        number = 0
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
            for row in record_batch.to_pylist():
                number += 1
                yield f"{path}, row {number}", row


def _iter_json(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":  # a JSON array file
            try:
                rows = json.load(handle)
            except ValueError as exc:
                raise BatchInputError(f"{path}: invalid JSON: {exc}") from None
            for number, row in enumerate(rows, 1):
                yield _checked_object(f"{path}, item {number}", row)
            return
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BatchInputError(f"{where}: invalid JSON: {exc}") from None
            yield _checked_object(where, row)


def _checked_object(where: str, row: Any) -> tuple[str, dict]:
    if not isinstance(row, dict):
        raise BatchInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return where, row


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    import csv

    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            yield f"{path}, line {reader.line_num}", dict(row)


def require_text(where: str, row: dict, name: str, hint: str = "") -> str:
    """The string in `row[name]`, or a BatchInputError naming the place and the fields present."""
    if name not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise BatchInputError(f"{where}: no `{name}` field (fields: {fields}){hint}")
    value = row[name]
    if not isinstance(value, str):
        raise BatchInputError(f"{where}: `{name}` must be a string, got {type(value).__name__}")
    return value


PROMPT_HINT = '; a prompts .jsonl needs {"prompt": "..."} on every line (or use a .txt file)'


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl (field `prompt`) or .txt (one per line) file; clear errors."""
    path = Path(path)
    prompts = [require_text(w, row, "prompt", PROMPT_HINT) for w, row in _prompt_records(path)]
    if not prompts:
        raise BatchInputError(f"{path}: no prompts in the file")
    return prompts


def _prompt_records(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix.lower() not in (".jsonl", ".json", ".txt"):
        raise BatchInputError(
            f"{path}: prompts must be a .jsonl file with a `prompt` field or a .txt file "
            "with one prompt per line"
        )
    return iter_records(path, text_column="prompt")


RowCheck = Callable[[str, dict], dict]


def stage_rows(
    records: Iterator[tuple[str, dict]], check: RowCheck | None = None, chunk_rows: int = CHUNK_ROWS
) -> tuple[list, int]:
    """Validate rows, give each an id, and put them in Ray's object store in chunks.

    Rows keep their `id` when the first row has one (every row must then); otherwise each
    gets `row_id`, its 0-based position in the file. Returns (object refs of Arrow tables,
    number of rows).
    """
    import pyarrow as pa
    import ray

    refs: list = []
    chunk: list[dict] = []
    has_id: bool | None = None
    count = chunk_bytes = 0
    for where, row in records:
        if has_id is None:
            has_id = ID_COLUMN in row
        if has_id and ID_COLUMN not in row:
            raise BatchInputError(f"{where}: no `id` field, but earlier rows have one")
        row = check(where, row) if check else row
        if not has_id:
            row = {**row, ROW_ID_COLUMN: count}
        chunk.append(row)
        chunk_bytes += _approx_size(row)
        count += 1
        if len(chunk) >= chunk_rows or chunk_bytes >= CHUNK_BYTES:
            refs.append(ray.put(pa.Table.from_pylist(chunk)))
            chunk, chunk_bytes = [], 0
    if chunk:
        refs.append(ray.put(pa.Table.from_pylist(chunk)))
    return refs, count


# ------------------------------------------------------------------------------ running


def _approx_size(row: dict) -> int:
    """Rough in-memory size of a row: string lengths, 16 bytes for anything else."""
    return sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in row.values())


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or start a local Ray) unless Ray is already up."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass(frozen=True)
class PoolOptions:
    """Actor pool and batch sizes; unset num_actors means one per GPU, or one CPU actor."""

    batch_size: int = 32
    num_actors: int | None = None
    cpus_per_actor: float = 1
    progress: bool = True
    address: str | None = None


def run_job(
    source: ModelSource,
    dataset,
    job: dict,
    pool: PoolOptions,
    total: int | None,
    description: str,
) -> Iterator:
    """Run `job` over a Ray dataset on an actor pool; yield result blocks (pyarrow) as they land."""
    import ray.data

    # Load the tokenizer here first: a broken model directory is then a clear error in the
    # driver rather than a failure inside every actor.
    _tokenizer_only(source)
    gpus = _cluster_gpus()
    actors = pool.num_actors or max(gpus, 1)
    job = {**job, "batch_size": pool.batch_size}
    mapped = dataset.map_batches(
        BatchWorker,
        fn_constructor_kwargs={"source": source, "job": job},
        batch_size=pool.batch_size * BUCKET_BATCHES,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=1 if gpus else 0,
    )
    # Our own display below shows rows/s and ETA; the dataset carries its own context copy.
    mapped.context.enable_progress_bars = False
    # Results in input order (generations follow the prompts file); costs little with one
    # operator, since actors already take blocks in order.
    mapped.context.execution_options.preserve_order = True
    with _quiet_ray_data(), progress_display(total, description, pool.progress) as advance:
        for block in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            advance(block.num_rows)
            yield block


@contextmanager
def _quiet_ray_data():
    """Ray Data's per-run INFO lines and its progress-bar notice would interleave with ours."""
    import logging

    levels = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    loggers = {name: logging.getLogger(name) for name in levels}
    before = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(max(levels[name], logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(before[name])


@contextmanager
def progress_display(total: int | None, description: str, enabled: bool = True):
    """A rich progress bar on stderr with rows done, rows/s and ETA; yields advance(n)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.1f} rows/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    start = time.monotonic()
    with progress:
        task = progress.add_task(description, total=total, rate=0.0)

        def advance(rows: int) -> None:
            done = progress.tasks[0].completed + rows
            rate = done / max(time.monotonic() - start, 1e-9)
            progress.update(task, advance=rows, rate=rate)

        yield advance


class OutputWriter:
    """Appends result blocks to a .jsonl or .parquet file; the file appears only when complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in OUTPUT_SUFFIXES:
            raise BatchInputError(
                f"output {self.path}: unsupported type {self.suffix or '(none)'}; allowed: "
                + ", ".join(OUTPUT_SUFFIXES)
            )
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.rows = 0
        self._handle = None
        self._parquet = None
        self._schema = None

    def __enter__(self) -> OutputWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.suffix == ".jsonl":
            self._handle = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, table) -> None:
        table = _public_columns(table)
        if self.suffix == ".jsonl":
            for row in table.to_pylist():
                self._handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            self._write_parquet(table)
        self.rows += table.num_rows

    def _write_parquet(self, table) -> None:
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.partial, table.schema)
            self._schema = table.schema
        elif table.schema != self._schema:
            # Blocks may differ where a column was all null in one of them.
            try:
                table = table.select(self._schema.names).cast(self._schema)
            except (KeyError, ValueError, TypeError) as exc:
                raise BatchInputError(
                    f"output {self.path}: rows do not share one schema ({exc}); write .jsonl instead"
                ) from None
        self._parquet.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._parquet is not None:
            self._parquet.close()
        elif self.suffix == ".parquet" and exc_type is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self.partial)
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def _public_columns(table):
    hidden = [n for n in table.column_names if n.startswith(INTERNAL_PREFIX) or n.startswith("__")]
    return table.drop_columns(hidden) if hidden else table


def _dataset_from_refs(refs: list, where: str):
    import ray.data

    if not refs:
        raise BatchInputError(f"{where}: no rows to process")
    return ray.data.from_arrow_refs(refs)


# ------------------------------------------------------------------------------ public jobs


def generate(
    model_ref: str | Path,
    prompts_path: str | Path,
    out_path: str | Path,
    gen_cfg: Any = None,
    prompt_template: str | None = None,
    *,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    task: str | None = None,
    instruction_format: bool = False,
    **gen_overrides: Any,
) -> Path:
    """Generate for every prompt; write one row per prompt and return sequence to `out_path`.

    Rows keep every input column (and `id`, or get `row_id`) and add `output` and
    `sequence_index`. `gen_cfg` is a GenerateConfig, dict or None; keyword overrides such as
    max_new_tokens=..., seed=... win over it. `prompt_template` places {prompt} (or
    {instruction}) and the row's {input}; `instruction_format` renders prompts as the data
    stage rendered instruction training rows (its default layout when the template is None).
    """
    pool = pool or PoolOptions(batch_size=16)
    source = resolve_model(model_ref, task=task)
    if source.task != "causal_lm":
        raise BatchInputError(
            f"generate needs a causal language model, but {model_ref} is a classification "
            f"model (labels: {', '.join(source.labels or ())})"
        )
    opts = GenerationOptions.from_config(gen_cfg, **gen_overrides)
    path = Path(prompts_path)
    if not instruction_format:
        check_template(prompt_template)

    def check(where: str, row: dict) -> dict:
        require_text(where, row, "prompt", PROMPT_HINT)
        return row

    writer = OutputWriter(out_path)
    ensure_ray(pool.address)
    refs, count = stage_rows(_prompt_records(path), check)
    dataset = _dataset_from_refs(refs, str(path))
    job = {
        "kind": "generation",
        "generate": asdict(opts),
        "prompt_field": "prompt",
        "prompt_template": prompt_template,
        "instruction_format": instruction_format,
        "max_length": max_length,
    }
    with writer:
        total = count * opts.num_return_sequences
        for block in run_job(source, dataset, job, pool, total, "generate"):
            writer.write(block)
    return writer.path


def score(
    model_ref: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    token_logprobs: bool = False,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    task: str | None = None,
) -> Path:
    """Score every row; write the rows with their scores to `out_path` (.jsonl or .parquet).

    Classification: `prob_<label>` per label, `predicted_id`, `predicted_label`.
    Causal LM: `log_likelihood` (sum), `log_likelihood_per_token`, `num_tokens` (and
    `token_logprobs` when asked) of `text_field`, or of `completion_field` given
    `prompt_field` when the first row has both.
    """
    pool = pool or PoolOptions()
    source = resolve_model(model_ref, task=task)
    path = Path(data_path)
    writer = OutputWriter(out_path)
    records = iter_records(path, text_column=text_field)
    first = _peek(records, path)
    if source.task == "classification":
        job: dict[str, Any] = {"kind": "classification", "text_field": text_field}
        fields = [text_field]
    else:
        pairs = prompt_field in first[1] and completion_field in first[1]
        fields = [prompt_field, completion_field] if pairs else [text_field]
        job = {
            "kind": "lm",
            "pairs": pairs,
            "text_field": text_field,
            "prompt_field": prompt_field,
            "completion_field": completion_field,
            "token_logprobs": token_logprobs,
        }
    job["max_length"] = max_length

    def check(where: str, row: dict) -> dict:
        for name in fields:
            require_text(where, row, name)
        return row

    ensure_ray(pool.address)
    refs, count = stage_rows(_chain(first, records), check)
    dataset = _dataset_from_refs(refs, str(path))
    with writer:
        for block in run_job(source, dataset, job, pool, count, "score"):
            writer.write(block)
    return writer.path


def _peek(records: Iterator[tuple[str, dict]], path: str | Path) -> tuple[str, dict]:
    try:
        return next(records)
    except StopIteration:
        raise BatchInputError(f"{path}: no rows to process") from None


def _chain(first: tuple[str, dict], rest: Iterator[tuple[str, dict]]):
    yield first
    yield from rest


@dataclass
class _EvalTotals:
    """Running sums over streamed result blocks (nothing per row but class ids)."""

    rows: int = 0
    nll: float = 0.0
    tokens: int = 0
    row_loss: float = 0.0
    exact_hits: float = 0.0
    predicted: list = field(default_factory=list)
    truth: list = field(default_factory=list)

    def add(self, block, references: str | None) -> None:
        names = set(block.column_names)
        self.rows += block.num_rows
        if "log_likelihood" in names:
            self.nll -= float(np.sum(block["log_likelihood"].to_numpy()))
            self.tokens += int(np.sum(block["num_tokens"].to_numpy()))
        if "row_loss" in names:
            self.row_loss += float(np.sum(block["row_loss"].to_numpy()))
            self.predicted.append(block["predicted_id"].to_numpy())
            self.truth.append(block[LABEL_ID].to_numpy())
        if references is not None and "output" in names:
            outputs = block["output"].to_pylist()
            refs = block[references].to_pylist()
            self.exact_hits += M.exact_match(outputs, refs) * len(outputs)


def _check_metrics(metrics: Sequence[str], task: str) -> list[str]:
    allowed = CAUSAL_METRICS if task == "causal_lm" else CLASSIFICATION_METRICS
    chosen = list(dict.fromkeys(metrics))
    wrong = [m for m in chosen if m not in allowed]
    if wrong or not chosen:
        raise BatchInputError(
            f"metric(s) {', '.join(wrong) or '(none)'} not available for a {task} model; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return chosen


def _label_check(labels: Sequence[str], label_field: str) -> Callable[[str, dict], int]:
    """Map a row's label (a name, or an id) to its class id, or explain what is allowed."""
    index = {name: i for i, name in enumerate(labels)}

    def to_id(where: str, row: dict) -> int:
        if label_field not in row:
            raise BatchInputError(f"{where}: no `{label_field}` field to evaluate against")
        value = row[label_field]
        if isinstance(value, str) and value in index:
            return index[value]
        is_id = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if is_id and 0 <= value < len(labels):
            return int(value)
        raise BatchInputError(
            f"{where}: label {value!r} is not one of {list(labels)} (or an id 0-{len(labels) - 1})"
        )

    return to_id


def evaluate(
    model_ref: str | Path,
    data,
    metrics: Sequence[str] = ("loss",),
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    prompt_field: str = "prompt",
    reference_field: str = "completion",
    gen_cfg: Any = None,
    prompt_template: str | None = None,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    out_dir: str | Path | None = None,
    task: str | None = None,
    instruction_format: bool = False,
) -> dict:
    """Evaluate a model on a data file, an Arrow table or a tokenized Ray dataset.

    Returns eval.json's content.

    Causal LM: loss and perplexity are token-weighted over the whole set (of `text_field`, or
    of `reference_field` given `prompt_field` when the first row has both); exact_match compares
    the greedy output for `prompt_field` with `reference_field` after whitespace normalisation.
    Classification: loss (mean cross-entropy), accuracy, macro precision/recall/F1, per-label
    scores and the confusion matrix. A tokenized dataset (the data stage's `input_ids` and
    `labels`) gives loss statistics and classification metrics, not exact_match.
    With `out_dir`, eval.json (and confusion_matrix.png for classification) are written there.
    """
    pool = pool or PoolOptions()
    source = resolve_model(model_ref, task=task)
    if labels:
        source = ModelSource(**{**asdict(source), "labels": tuple(labels)})
    chosen = _check_metrics(metrics, source.task)
    ensure_ray(pool.address)
    if isinstance(data, (str, Path)) or _is_arrow_table(data):
        records, name = _eval_records(data, text_field)
        dataset, total, job, references = _eval_input_from_records(
            records, name, source, chosen, text_field, label_field, prompt_field, reference_field
        )
    else:
        if "exact_match" in chosen:
            raise BatchInputError("exact_match needs a data file with prompts and references")
        # A materialized dataset knows its size; counting a lazy one would run it twice.
        from ray.data.dataset import MaterializedDataset

        total = data.count() if isinstance(data, MaterializedDataset) else None
        dataset, references = data, None
        job = {"kind": "tokenized_eval"}
    if "exact_match" in chosen:
        opts = GenerationOptions.from_config(gen_cfg)
        job["generate"] = asdict(opts)
        job["prompt_template"] = prompt_template
        job["instruction_format"] = instruction_format
    job.update(keep_columns=False, max_length=max_length)
    totals = _EvalTotals()
    for block in run_job(source, dataset, job, pool, total, "evaluate"):
        totals.add(block, references)
    result = _eval_result(totals, chosen, source)
    if out_dir is not None:
        write_eval(result, Path(out_dir))
    return result


def _is_arrow_table(data: Any) -> bool:
    import pyarrow as pa

    return isinstance(data, pa.Table)


def _eval_records(data: Any, text_field: str) -> tuple[Iterator[tuple[str, dict]], str]:
    """(location, row) pairs of a data file or an in-memory Arrow table, and its name."""
    if _is_arrow_table(data):
        rows = ((f"row {i + 1}", row) for i, row in enumerate(data.to_pylist()))
        return rows, "evaluation table"
    return iter_records(Path(data), text_column=text_field), str(data)


def _eval_input_from_records(
    records: Iterator[tuple[str, dict]],
    path: str,
    source: ModelSource,
    chosen: list[str],
    text_field: str,
    label_field: str,
    prompt_field: str,
    reference_field: str,
):
    first = _peek(records, path)
    references = None
    if source.task == "classification":
        to_id = _label_check(source.labels or (), label_field)
        job: dict[str, Any] = {"kind": "classification", "text_field": text_field}

        def check(where: str, row: dict) -> dict:
            require_text(where, row, text_field)
            return {**row, LABEL_ID: to_id(where, row)}

    else:
        pairs = prompt_field in first[1] and reference_field in first[1]
        needs_nll = bool({"loss", "perplexity"} & set(chosen))
        fields = []
        if needs_nll:
            fields += [prompt_field, reference_field] if pairs else [text_field]
        if "exact_match" in chosen:
            fields += [prompt_field, reference_field]
            references = reference_field
        job = {
            "kind": "lm",
            "nll": needs_nll,
            "pairs": pairs,
            "text_field": text_field,
            "prompt_field": prompt_field,
            "completion_field": reference_field,
            # Output blocks keep only computed columns; the references ride along.
            "carry": [references] if references else [],
        }

        def check(where: str, row: dict) -> dict:
            for name in dict.fromkeys(fields):
                require_text(where, row, name)
            return row

    refs, count = stage_rows(_chain(first, records), check)
    return _dataset_from_refs(refs, str(path)), count, job, references


def _eval_result(totals: _EvalTotals, chosen: list[str], source: ModelSource) -> dict:
    result: dict[str, Any] = {"num_rows": totals.rows}
    if source.task == "causal_lm":
        if {"loss", "perplexity"} & set(chosen):
            result["num_tokens"] = totals.tokens
            if "loss" in chosen:
                result["loss"] = M.token_weighted_loss([totals.nll], [totals.tokens])
            if "perplexity" in chosen:
                result["perplexity"] = M.perplexity([totals.nll], [totals.tokens])
        if "exact_match" in chosen:
            result["exact_match"] = totals.exact_hits / max(totals.rows, 1)
        return result
    truth = np.concatenate(totals.truth) if totals.truth else np.zeros(0, dtype=np.int64)
    predicted = np.concatenate(totals.predicted) if totals.predicted else truth
    if "loss" in chosen:
        result["loss"] = totals.row_loss / max(totals.rows, 1)
    report = M.classification_metrics(truth, predicted, list(source.labels or ()))
    for name in ("accuracy", "precision", "recall", "f1"):
        if name in chosen:
            result[name] = report[name]
    result["per_label"] = report["per_label"]
    result["confusion_matrix"] = report["confusion_matrix"]
    return result


def write_eval(result: dict, out_dir: Path) -> Path:
    """Write eval.json (and confusion_matrix.png when there is a matrix); return eval.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "eval.json"
    target.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    if "confusion_matrix" in result:
        plot_confusion(result, out_dir / "confusion_matrix.png")
    return target


def plot_confusion(result: dict, png_path: str | Path) -> Path:
    """Draw the confusion matrix of an evaluation result as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["confusion_matrix"]["labels"]
    matrix = np.asarray(result["confusion_matrix"]["matrix"])
    size = max(3.0, 0.8 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j, i, str(count), ha="center", va="center", color="white" if count > limit else "black"
        )
    accuracy = result.get("accuracy")
    ax.set_title(
        "confusion matrix" + (f" (accuracy {accuracy:.3f})" if accuracy is not None else "")
    )
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------- after training (driver)


def _evaluation_table(recipe: Any, base_dir: Path | None = None):
    """Canonical rows to evaluate on: evaluate.data, else the test split, else validation."""
    import pyarrow as pa

    from launcher import data as D

    if recipe.evaluate.data:
        table = D.read_source(recipe.evaluate.data, D.fields_for(recipe), base_dir).table
        return table.append_column("row_id", pa.array(np.arange(table.num_rows)))
    tables = D.load_tables(recipe, base_dir)
    for split in ("test", "validation"):
        if split in tables:
            return tables[split]
    raise BatchInputError(
        "evaluate: nothing to evaluate on; set evaluate.data, give data.test or "
        "data.validation, or carve one with data.split"
    )


def evaluate_run(
    recipe: Any, run_dir: str | Path, *, base_dir: Path | None = None, progress: bool = True
) -> dict:
    """The recipe's `evaluate:` section over run_dir's model; writes run_dir/eval.json.

    Loss and perplexity (and the classification metrics) run on rows tokenized exactly as in
    training (the data stage's tokenizer function, so instruction prompts are masked the same
    way); exact_match generates greedily from each instruction prompt and compares with its
    `output`. Classification also writes run_dir/confusion_matrix.png.
    """
    import ray.data

    from launcher import data as D

    run_dir = Path(run_dir)
    cfg = recipe.evaluate
    pool = PoolOptions(batch_size=cfg.batch_size, progress=progress)
    ensure_ray(pool.address)
    table = _evaluation_table(recipe, base_dir)
    chosen = list(dict.fromkeys(cfg.metrics))
    result: dict[str, Any] = {}
    statistics = [m for m in chosen if m != "exact_match"]
    if statistics:
        source = resolve_model(run_dir)
        _, tokenizer = _tokenizer_only(source)
        tokenized = ray.data.from_arrow(table).map_batches(
            D.tokenizer_for_batches(recipe, tokenizer),
            batch_format="pyarrow",
            batch_size=D.TOKENIZE_BATCH_ROWS,
        )
        result.update(evaluate(run_dir, tokenized, statistics, pool=pool))
    if "exact_match" in chosen:
        if recipe.data.format != "instruction":
            raise BatchInputError(
                "evaluate.metrics: exact_match needs data.format: instruction (a prompt and a "
                f"reference output per row); this recipe's format is {recipe.data.format}"
            )
        pairs = table.select(["instruction", "input", "output"]).rename_columns(
            ["prompt", "input", "reference"]
        )
        matched = evaluate(
            run_dir,
            pairs,
            ["exact_match"],
            prompt_field="prompt",
            reference_field="reference",
            gen_cfg=recipe.generate,
            prompt_template=recipe.data.prompt_template,
            instruction_format=True,
            pool=pool,
        )
        result.setdefault("num_rows", matched["num_rows"])
        result["exact_match"] = matched["exact_match"]
    write_eval(result, run_dir)
    return result


def _tokenizer_only(source: ModelSource):
    """The tokenizer the batch actors will use (adapter's own when it ships one)."""
    from launcher.models import load_tokenizer

    cfg = source.model_config()
    if source.adapter and _has_tokenizer(Path(source.adapter)):
        cfg = cfg.model_copy(update={"name_or_path": source.adapter, "gguf_file": None})
    return cfg, load_tokenizer(cfg)


def generate_run(
    recipe: Any, run_dir: str | Path, *, base_dir: Path | None = None, progress: bool = True
) -> Path:
    """The recipe's `generate:` section over run_dir's model; writes run_dir/generations.jsonl.

    Instruction recipes render each prompt (with the row's `input`, if any) exactly as the
    training prompts were rendered, so the model sees the layout it learned.
    """
    run_dir = Path(run_dir)
    cfg = recipe.generate
    prompts = Path(cfg.prompts)
    if base_dir is not None and not prompts.is_absolute():
        prompts = base_dir / prompts
    instruction = recipe.data.format == "instruction"
    return generate(
        run_dir,
        prompts,
        run_dir / "generations.jsonl",
        cfg,
        recipe.data.prompt_template if instruction else None,
        instruction_format=instruction,
        pool=PoolOptions(batch_size=16, progress=progress),
        seed=recipe.train.seed,
    )


__all__ = [
    "BatchInputError",
    "GenerationOptions",
    "ModelSource",
    "OutputWriter",
    "PoolOptions",
    "apply_template",
    "evaluate",
    "evaluate_run",
    "generate",
    "generate_run",
    "length_buckets",
    "load_for_inference",
    "plot_confusion",
    "read_prompts",
    "resolve_model",
    "score",
    "write_eval",
]
