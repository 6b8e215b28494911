"""Knowledge distillation and adversarial training around the training loop.

In the driver, before training (`prepare_distillation`):
  1. the teacher's tokenizer must have exactly the student's vocabulary (logits are compared
     entry by entry); a mismatch is a `VocabularyMismatch` naming the first differing tokens;
  2. `distill.init_student_from_teacher` builds the student from the teacher (its config with
     only the listed blocks, DistilBERT-style), saves it once under `distill.cache_dir` and
     points `model.name_or_path` at it, so workers, export and evaluation load a plain model;
  3. `distill.mode: offline` runs the teacher once over the tokenized training split in a Ray
     Data actor and stores its top-k log-probabilities and token ids as Arrow columns beside
     the tokens (`teacher_logprobs`, `teacher_ids`, flattened per row), cached on disk under a
     hash of teacher, data and tokenization settings; a later run with the same settings reads
     the cache and no teacher is ever loaded.

In each training worker: `build_teacher` (online mode: frozen, eval, no gradients, the run's
dtype; sharded with fully_shard under fsdp and partitioned by a second DeepSpeed engine under
ZeRO-3), `make_objective` (the loss of one micro-batch with its parts for the metrics) and
`make_adversary` (FGM on the input embeddings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from launcher.collate import collate, model_inputs
from launcher.errors import BadInputError
from launcher.models import (
    BlocksNotFoundError,
    _source,
    deferred_checkpoint_weights,
    load_model,
    load_tokenizer,
    model_config_of,
    resolve_dtype,
    transformer_blocks,
)
from launcher.objectives import (
    align_logits,
    compute_loss,
    count_tokens,
    distillation_loss,
    fgm_backward,
    kl_to_teacher,
    task_loss,
    topk_kl_to_teacher,
)
from launcher.raysession import in_process_allowed
from launcher.recipe import ModelConfig, Recipe

CACHE_FORMAT = 1  # bump when the stored layout changes: old cache entries are then ignored
TEACHER_BATCH_ROWS = 16
# Up to this many training rows without GPUs the offline teacher pass runs in the driver:
# starting an actor that imports torch and loads the teacher costs more than the pass.
TEACHER_IN_DRIVER_ROWS = 1_000

Objective = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class DistillError(BadInputError, ValueError):
    """A distillation setup that cannot work (bad teacher, layers, labels): exit code 2."""


class VocabularyMismatch(DistillError):
    """Teacher and student tokenizers differ, so their logits cannot be compared entry by entry."""


# ----------------------------------------------------------------------------- vocabulary


def teacher_model_config(recipe: Recipe) -> ModelConfig:
    """The student's model section with the teacher's weights (same task, labels and dtype)."""
    teacher = recipe.distill.teacher
    return recipe.model.model_copy(
        update={"name_or_path": teacher.name_or_path, "gguf_file": teacher.gguf_file}
    )


def vocabulary_differences(student: dict[str, int], teacher: dict[str, int], limit: int = 5):
    """Lines naming the first token ids where the two vocabularies disagree."""
    by_id_s = {i: t for t, i in student.items()}
    by_id_t = {i: t for t, i in teacher.items()}
    lines = []
    for i in sorted(set(by_id_s) | set(by_id_t)):
        a, b = by_id_s.get(i), by_id_t.get(i)
        if a != b:
            lines.append(
                f"id {i}: student {a!r} / teacher {b!r}"
                if a is not None and b is not None
                else f"id {i}: only in the {'student' if b is None else 'teacher'} "
                f"({a if b is None else b!r})"
            )
        if len(lines) == limit:
            break
    return lines


def check_vocabularies(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Raise VocabularyMismatch unless both tokenizers map the same tokens to the same ids."""
    a, b = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if a == b:
        return
    differences = vocabulary_differences(a, b)
    raise VocabularyMismatch(
        f"distill.teacher: {teacher} has a different tokenizer vocabulary than the student "
        f"{student} ({len(b)} vs {len(a)} tokens); logits distillation compares the two "
        f"models' outputs token by token, so they must share the vocabulary. First "
        f"differences: {'; '.join(differences)}"
    )


def check_teacher_head(recipe: Recipe) -> str | None:
    """Classification: the teacher must predict as many labels as model.labels has. Returns a
    warning when it has no classification head at all (its head then starts random, which only
    a smoke test wants)."""
    if recipe.model.task != "classification":
        return None
    # The teacher's own config: no task-head settings from the recipe laid over it.
    teacher = teacher_model_config(recipe).model_copy(update={"task": "causal_lm"})
    config = model_config_of(teacher)
    name = recipe.distill.teacher.name_or_path
    labels = list(recipe.model.labels or [])
    heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    if not heads:
        return (
            f"warning: distill.teacher {name} has no sequence classification head "
            f"(architectures: {config.architectures}); its head starts random. Distil from a "
            f"teacher fine-tuned on the labels {labels}"
        )
    teacher_labels = [config.id2label[i] for i in sorted(config.id2label)]
    if len(teacher_labels) != len(labels):
        raise DistillError(
            f"distill.teacher: {name} predicts {len(teacher_labels)} labels {teacher_labels}; "
            f"model.labels has {len(labels)} {labels}"
        )
    return None


# ------------------------------------------------------------------ student from teacher


def student_key(teacher_key: str, prefix: str, layers: list[int]) -> str | None:
    """The student's name for a teacher weight, or None when its block is not kept."""
    if not teacher_key.startswith(prefix):
        return teacher_key
    index, _, rest = teacher_key[len(prefix) :].partition(".")
    if int(index) not in layers:
        return None
    return f"{prefix}{layers.index(int(index))}.{rest}"


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A student with the teacher's config but only `layers` (in that order) as its blocks;
    those blocks and every weight outside the blocks are copied from the teacher."""
    import copy

    try:
        path, blocks = transformer_blocks(teacher)
    except BlocksNotFoundError as exc:
        raise DistillError(f"distill.init_student_from_teacher: {exc}") from None
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise DistillError(
            f"distill.init_student_from_teacher: layer(s) {bad} do not exist; the teacher "
            f"has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # GPT-2 maps it to n_layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config)
    prefix = f"{path}."
    state = {}
    for key, value in teacher.state_dict().items():
        new = student_key(key, prefix, layers)
        if new is not None:
            state[new] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).dtype)


def _fingerprint(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights: a hub id as is; a local directory by its files'
    names, sizes and modification times (cheap, and changes whenever the files change)."""
    path = Path(_source(name_or_path))
    if not path.exists():
        return {"hub": name_or_path}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path.resolve()),
        "files": [
            [
                str(f.relative_to(path) if path.is_dir() else f.name),
                f.stat().st_size,
                f.stat().st_mtime_ns,
            ]
            for f in files
        ],
    }


def cache_root(recipe: Recipe) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(recipe.distill.cache_dir)))


def _digest(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def build_student_dir(recipe: Recipe, tokenizer) -> Path:
    """Build (once) and save the student made from the teacher's layers; returns its directory."""
    d = recipe.distill
    settings = {
        "format": CACHE_FORMAT,
        "teacher": _fingerprint(d.teacher.name_or_path),
        "gguf": d.teacher.gguf_file,
        "layers": d.init_student_from_teacher,
        "task": recipe.model.task,
        "labels": recipe.model.labels,
    }
    out = cache_root(recipe) / "students" / _digest(settings)
    if (out / "ftlaunch-student.json").exists():
        return out
    teacher = load_model(
        teacher_model_config(recipe), dtype=torch.float32, pad_token_id=tokenizer.pad_token_id
    )
    student = student_from_teacher(teacher, list(d.init_student_from_teacher))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ftlaunch-student.json").write_text(json.dumps(settings, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------- offline teacher pass


def offline_settings(recipe: Recipe, tokenizer, data) -> dict[str, Any]:
    """Everything the stored teacher outputs depend on: teacher, data, tokenization."""
    d = recipe.data
    specs = d.train if isinstance(d.train, str) else [s.model_dump() for s in d.train]
    paths = [d.train] if isinstance(d.train, str) else [s.path for s in d.train]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "format": CACHE_FORMAT,
        "teacher": _fingerprint(recipe.distill.teacher.name_or_path),
        "gguf": recipe.distill.teacher.gguf_file,
        "teacher_dtype": recipe.model.dtype,
        "top_k": recipe.distill.top_k,
        "task": recipe.model.task,
        "labels": recipe.model.labels,
        "data": d.model_dump(mode="json"),
        "train": specs,
        "train_files": [_fingerprint(p) if not p.startswith("hf:") else p for p in paths],
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "special_tokens": tokenizer.special_tokens_map,
        "rows": data.num_rows["train"],
    }


def _batch_arrays(table) -> dict[str, np.ndarray]:
    """A pyarrow batch as the numpy dict `launcher.collate.collate` takes."""
    out = {}
    for name in ("input_ids", "attention_mask", "labels", "position_ids"):
        if name not in table.column_names:
            continue
        values = table.column(name).to_pylist()
        if values and isinstance(values[0], list):
            array = np.empty(len(values), dtype=object)
            array[:] = [np.asarray(v) for v in values]
            out[name] = array
        else:
            out[name] = np.asarray(values)
    return out


class TeacherTopK:
    """Ray Data actor: adds the teacher's top-k log-probabilities and ids to tokenized rows."""

    def __init__(self, recipe_data: dict, pad_token_id: int):
        recipe = Recipe.model_validate(recipe_data)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.task = recipe.model.task
        self.top_k = recipe.distill.top_k
        self.pad = pad_token_id
        self.model = load_model(
            teacher_model_config(recipe),
            dtype=resolve_dtype(recipe.model.dtype, self.device),
            pad_token_id=pad_token_id,
        ).eval()
        self.model.to(self.device)

    def __call__(self, table):
        import pyarrow as pa

        batch = {k: v.to(self.device) for k, v in collate(_batch_arrays(table), self.pad).items()}
        with torch.no_grad():
            logits = self.model(**model_inputs(batch)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        k = min(self.top_k, logprobs.size(-1))
        top, ids = (t.cpu() for t in logprobs.topk(k, dim=-1))
        values, indices = [], []
        lengths = (
            [len(v) for v in table.column("input_ids").to_pylist()]
            if self.task == "causal_lm"
            else [1] * table.num_rows
        )
        for row, length in enumerate(lengths):
            # Causal LM: one top-k per real token (padding dropped); classification: one per row.
            values.append(
                top[row, :length].reshape(-1).tolist()
                if self.task == "causal_lm"
                else top[row].tolist()
            )
            indices.append(
                ids[row, :length].reshape(-1).tolist()
                if self.task == "causal_lm"
                else ids[row].tolist()
            )
        table = table.append_column("teacher_logprobs", pa.array(values, pa.list_(pa.float32())))
        return table.append_column("teacher_ids", pa.array(indices, pa.list_(pa.int32())))


def _read_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def attach_teacher_outputs(recipe: Recipe, data, tokenizer, note: Callable[[str], None]):
    """The prepared data with the training split carrying the teacher's top-k columns, from
    the cache when an earlier run stored them with the same settings, else computed once."""
    import ray.data

    settings = offline_settings(recipe, tokenizer, data)
    key = _digest(settings)
    entry = cache_root(recipe) / "teacher" / key
    meta_file = entry / "meta.json"
    meta = _read_meta(meta_file)
    if meta.get("complete"):
        meta["reuses"] = meta.get("reuses", 0) + 1
        meta["last_used"] = time.time()
        meta_file.write_text(json.dumps(meta, indent=2, default=str))
        note(f"teacher outputs reused from {entry} (cache key {key})")
    else:
        note(f"running the teacher once over {data.num_rows['train']:,} training rows")
        gpus = int(ray.cluster_resources().get("GPU", 0)) if recipe.scaling.use_gpu else 0
        tmp = entry.with_name(entry.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        teacher_args = {
            "recipe_data": recipe.model_dump(mode="json"),
            "pad_token_id": tokenizer.pad_token_id,
        }
        if teacher_pass_in_driver(gpus, data.num_rows["train"]):
            _teacher_pass_here(data.datasets["train"], teacher_args, tmp / "rows")
        else:
            data.datasets["train"].map_batches(
                TeacherTopK,
                fn_constructor_kwargs=teacher_args,
                batch_format="pyarrow",
                batch_size=TEACHER_BATCH_ROWS,
                concurrency=max(gpus, 1),  # one teacher per GPU, else one on a CPU
                num_cpus=1,
                num_gpus=1 if gpus else 0,
            ).write_parquet(str(tmp / "rows"))
        meta = {
            "key": key,
            "settings": settings,
            "rows": data.num_rows["train"],
            "teacher_passes": meta.get("teacher_passes", 0) + 1,
            "reuses": 0,
            "created": time.time(),
            "complete": True,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
        note(f"teacher outputs stored in {entry} (cache key {key})")
    train = ray.data.read_parquet(str(entry / "rows")).materialize()
    if train.count() != data.num_rows["train"]:
        raise DistillError(
            f"distill.cache_dir: {entry} holds {train.count()} rows but the training split has "
            f"{data.num_rows['train']}; delete that directory to recompute it"
        )
    return dataclasses.replace(data, datasets={**data.datasets, "train": train})


def teacher_pass_in_driver(gpus: int, rows: int) -> bool:
    """Small CPU passes run here; FTLAUNCH_IN_PROCESS=0 keeps them on an actor, as for the
    batch stage and training."""
    return in_process_allowed() and not gpus and rows <= TEACHER_IN_DRIVER_ROWS


def _teacher_pass_here(dataset, teacher_args: dict[str, Any], out: Path) -> None:
    """The teacher pass in this process, written as the actor pool writes it (Parquet rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    threads = torch.get_num_threads()  # TeacherTopK pins one thread, as for a pool actor
    try:
        teacher = TeacherTopK(**teacher_args)
        blocks = [
            teacher(batch)
            for batch in dataset.iter_batches(batch_size=TEACHER_BATCH_ROWS, batch_format="pyarrow")
        ]
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True)
    pq.write_table(pa.concat_tables(blocks), out / "rows-0.parquet")


# ----------------------------------------------------------------------------- driver hook


def prepare_distillation(recipe: Recipe, data, tokenizer, view=None) -> tuple[Recipe, Any]:
    """Before training: vocabulary and head checks, the student from teacher layers, and the
    offline teacher pass. Returns the recipe to run (model.name_or_path may now name the
    built student) and the prepared data (offline: train rows carry the teacher columns)."""
    if recipe.distill is None:
        return recipe, data

    def note(text: str) -> None:
        if view is not None:
            view.note(text)

    teacher_cfg = teacher_model_config(recipe)
    teacher_tokenizer = load_tokenizer(teacher_cfg)
    check_vocabularies(
        tokenizer, teacher_tokenizer, recipe.model.name_or_path, teacher_cfg.name_or_path
    )
    warning = check_teacher_head(recipe)
    if warning:
        note(warning)
    if recipe.distill.init_student_from_teacher:
        student = build_student_dir(recipe, tokenizer)
        note(f"student built from teacher layers {recipe.distill.init_student_from_teacher}")
        recipe = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"name_or_path": str(student)})}
        )
    if recipe.distill.mode == "offline":
        data = attach_teacher_outputs(recipe, data, tokenizer, note)
    return recipe, data


# ----------------------------------------------------------------------------- in workers


class _Teacher:
    """Calls the frozen teacher (under autocast when the run uses mixed precision with ddp)."""

    def __init__(self, module: nn.Module, autocast: tuple[str, torch.dtype] | None):
        self.module = module
        self.autocast = autocast

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.autocast is None:
                return self.module(**model_inputs(batch)).logits
            with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
                return self.module(**model_inputs(batch)).logits


def _frozen_for_inference(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(recipe: Recipe, strategy, device: torch.device, pad_token_id: int | None):
    """Online distillation: the teacher on this worker, frozen and in eval mode, in the run's
    dtype; None for offline mode or no distillation. Under fsdp the teacher is sharded with
    fully_shard like the student; under deepspeed ZeRO-3 it is partitioned at build time and
    driven by an inference-only engine, so a teacher larger than one worker's memory fits."""
    if recipe.distill is None or recipe.distill.mode != "online":
        return None
    from launcher.strategies import resolve_precision

    cfg = teacher_model_config(recipe)

    def load() -> nn.Module:
        model = load_model(cfg, dtype=resolve_dtype(cfg.dtype, device), pad_token_id=pad_token_id)
        return _frozen_for_inference(model)

    name = recipe.strategy.name
    if name == "fsdp":
        return _Teacher(_sharded_teacher(load, device, strategy), None)
    if name == "deepspeed" and recipe.strategy.zero_stage == 3:
        return _Teacher(_zero3_teacher(load, strategy), None)
    if name == "deepspeed":
        # Stages 0-2 keep full weights on every rank; DeepSpeed's bf16/fp16 casts the student.
        precision = strategy.config.get("bf16", {}).get("enabled") and torch.bfloat16
        model = load().to(device)
        return _Teacher(model.to(precision) if precision else model, None)
    precision = resolve_precision(recipe, device)
    autocast = (device.type, precision) if precision is not None else None
    return _Teacher(load().to(device), autocast)


def _sharded_teacher(load: Callable[[], nn.Module], device: torch.device, strategy) -> nn.Module:
    """FSDP2: sharded like the student, each rank reading only its shard of the teacher's
    weights (rank 0 loads a checkpoint that cannot be read in parts); never offloaded, since it
    only runs forward."""
    from launcher.sharded_load import shard_and_load, whole_on_first_rank

    with deferred_checkpoint_weights(whole_load=whole_on_first_rank):
        model = load()
    options = strategy.shard_options(reduce_dtype=None)
    options.pop("offload_policy", None)
    shard_and_load(model, device, options)
    return _frozen_for_inference(model)


def _zero3_teacher(load: Callable[[], nn.Module], strategy) -> nn.Module:
    """ZeRO-3: built under zero.Init (each rank holds its partition) and wrapped in an engine
    without optimizer, which gathers each layer's parameters for the forward pass."""
    from launcher.sharded_load import build_partitioned, import_deepspeed

    deepspeed = import_deepspeed()

    config = {
        k: v
        for k, v in strategy.config.items()
        if k not in ("optimizer", "scheduler", "gradient_clipping")
    }
    zero = dict(config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero
    model = build_partitioned(load, config)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine


def make_objective(recipe: Recipe, teacher: _Teacher | None) -> Objective:
    """The loss of one micro-batch: (loss, tokens, parts). Parts are per-micro-batch values
    the loop sums into the window's extra metrics (task_loss and distill_loss)."""
    task = recipe.model.task
    if recipe.distill is None:

        def plain(
            module: nn.Module, batch: dict
        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            loss, tokens = compute_loss(module, batch, task)
            return loss, tokens, {}

        return plain
    d = recipe.distill

    def distilled(
        module: nn.Module, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        student = align_logits(module(**model_inputs(batch)).logits, labels, task)
        hard = task_loss(student, labels, task)
        if teacher is not None:
            kl = kl_to_teacher(student, teacher.logits(batch), labels, task, d.temperature)
        else:
            kl = topk_kl_to_teacher(
                student,
                batch["teacher_logprobs"],
                batch["teacher_ids"],
                labels,
                task,
                d.temperature,
            )
        loss, soft = distillation_loss(hard, kl, d.alpha, d.temperature)
        parts = {"task_loss": hard.detach().float(), "distill_loss": soft.detach().float()}
        return loss, count_tokens(batch), parts

    return distilled


Adversary = Callable[[nn.Module, dict, Objective, Callable[[torch.Tensor], None]], None]


def make_adversary(recipe: Recipe, model: nn.Module) -> Adversary | None:
    """FGM for `train.adversarial`, or None. Call it after the clean backward, with the module,
    the batch, the objective and the strategy's backward: it adds the adversarial gradient.

    With tied input and output embeddings (GPT-2) the perturbed weights are the output layer's
    too, as in any FGM on the embedding weights of such a model.
    """
    adversarial = recipe.train.adversarial
    if adversarial is None:
        return None
    embedding = model.get_input_embeddings().weight

    def adversary(module: nn.Module, batch: dict, objective: Objective, backward) -> None:
        def loss() -> torch.Tensor:
            return objective(module, batch)[0]

        fgm_backward(embedding, adversarial.epsilon, loss, backward)

    return adversary
