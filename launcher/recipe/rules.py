"""Cross-field rules the schema alone cannot express, and validation of plain recipe data.

`validate_data` reports schema errors and rule violations together: a recipe with schema errors
is repaired (bad values dropped, missing fields filled with placeholders) so the rules still
check everything else, and every problem is reported in one go.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from launcher.deepspeed_config import check_deepspeed_overrides
from launcher.metrics import METRICS_BY_TASK
from launcher.recipe.problems import (
    Doc,
    Problem,
    RecipeError,
    clean_loc,
    mark_for,
    problems_from_validation,
    sort_problems,
)
from launcher.recipe.schema import Recipe, field_at, section_type

# finetune fields that only some methods read: field -> the method(s) it applies to.
METHOD_KEYS = {
    "lora": ("lora", "qlora"),
    "qlora": "qlora",
    "adapter": "adapter",
    "num_virtual_tokens": ("prefix", "prompt"),
    "trainable_layers": "freeze",
}


def inapplicable_fields(recipe: Recipe) -> dict[str, str]:
    """Fields that would do nothing for this recipe, each with the reason.

    Setting one of them explicitly is an error; the resolved recipe leaves them out.
    """
    out: dict[str, str] = {}
    s = recipe.strategy
    if s.name != "deepspeed":
        out["strategy.zero_stage"] = f"only applies to strategy.name: deepspeed (got {s.name})"
        out["strategy.deepspeed_config"] = (
            f"only applies to strategy.name: deepspeed (got {s.name})"
        )
    if s.name == "ddp":
        out["strategy.offload"] = "only applies to strategy.name: deepspeed or fsdp (got ddp)"
    method = recipe.finetune.method
    for key, methods in METHOD_KEYS.items():
        allowed = (methods,) if isinstance(methods, str) else methods
        if method not in allowed:
            out[f"finetune.{key}"] = (
                f"only applies to finetune.method: {' or '.join(allowed)} (got {method})"
            )
    task = recipe.model.task
    if task != "classification":
        out["model.labels"] = f"only applies to model.task: classification (got {task})"
        out["data.label_field"] = f"only applies to model.task: classification (got {task})"
        out["data.balance"] = f"only applies to model.task: classification (got {task})"
    fmt = recipe.data.format
    if fmt != "instruction":
        for key in ("instruction_fields", "prompt_template"):
            out[f"data.{key}"] = f"only applies to data.format: instruction (got {fmt})"
    if fmt == "instruction":
        out["data.text_field"] = "does nothing with data.format: instruction"
    if fmt != "chat":
        for key in ("messages_field", "chat_template", "system_prompt", "train_on"):
            out[f"data.{key}"] = f"only applies to data.format: chat (got {fmt})"
    if fmt == "chat":
        out["data.text_field"] = "does nothing with data.format: chat"
    if fmt not in ("text", "chat"):
        out["data.packing"] = f"only applies to data.format: text or chat (got {fmt})"
    if recipe.train.warmup_steps is not None:
        out["train.warmup_ratio"] = "does nothing when train.warmup_steps is set (steps win)"
    if recipe.distill is not None and recipe.distill.mode != "offline":
        out["distill.top_k"] = "only applies to distill.mode: offline"
    if recipe.distill is not None and not (
        recipe.distill.mode == "offline" or recipe.distill.init_student_from_teacher
    ):
        out["distill.cache_dir"] = (
            "only applies to distill.mode: offline or distill.init_student_from_teacher"
        )
    if recipe.generate is not None and not recipe.generate.do_sample:
        out["generate.temperature"] = "only applies with generate.do_sample: true"
        out["generate.top_p"] = "only applies with generate.do_sample: true"
    if recipe.scaling.max_workers == 1:
        out["scaling.placement"] = "only applies with scaling.num_workers above 1 (got 1)"
    if not recipe.scaling.elastic:
        out["scaling.resize_interval_s"] = (
            "only applies to elastic training (scaling.num_workers: [min, max] with min < max)"
        )
    if recipe.cluster.target != "ray":
        out["cluster.address"] = (
            f"only applies to cluster.target: ray (got {recipe.cluster.target})"
        )
    if recipe.cluster.target != "kuberay":
        for key in (
            "namespace",
            "gpus_per_worker",
            "secret",
            "head_memory",
            "worker_memory",
            "ttl_seconds_after_finished",
            "active_deadline_seconds",
            "backoff_limit",
        ):
            out[f"cluster.{key}"] = (
                f"only applies to cluster.target: kuberay (got {recipe.cluster.target})"
            )
    return out


def _explicitly_set(recipe: Recipe, dotted: str) -> bool:
    obj: Any = recipe
    parts = dotted.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return parts[-1] in obj.model_fields_set


def reported_metrics(recipe: Recipe) -> set[str]:
    """Metric names the training run reports, for checking `checkpoint.metric`."""
    metrics = {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"}
    if recipe.distill is not None:
        metrics |= {"task_loss", "distill_loss"}
    if has_validation(recipe):
        metrics |= {"eval_loss"}
        metrics |= (
            {"eval_perplexity"}
            if recipe.model.task == "causal_lm"
            else {"eval_accuracy", "eval_f1"}
        )
    return metrics


def has_validation(recipe: Recipe) -> bool:
    """Whether the run has validation data (given, or carved from train)."""
    return recipe.data.validation is not None or recipe.data.split.validation > 0


def check_rules(recipe: Recipe) -> list[Problem]:
    """Cross-field rules the schema alone cannot express; every violation is reported."""
    problems = [
        Problem(path, f"{reason}; remove it")
        for path, reason in inapplicable_fields(recipe).items()
        if _explicitly_set(recipe, path)
    ]
    m, d, t, s = recipe.model, recipe.data, recipe.train, recipe.strategy
    if m.task == "classification" and not m.labels:
        problems.append(
            Problem(
                "model.labels", "required for model.task: classification (label names in id order)"
            )
        )
    if m.labels and len(set(m.labels)) != len(m.labels):
        problems.append(Problem("model.labels", "label names must be unique"))
    if m.task == "classification" and d.format != "classification":
        problems.append(
            Problem(
                "data.format",
                f"must be classification for model.task: classification (got {d.format})",
            )
        )
    if m.task == "causal_lm" and d.format == "classification":
        problems.append(
            Problem("data.format", "classification data needs model.task: classification")
        )
    if recipe.evaluate is not None:
        # The batch stage checks this too, but only after training; say it before.
        allowed = METRICS_BY_TASK[m.task]
        for metric in recipe.evaluate.metrics:
            if metric not in allowed:
                problems.append(
                    Problem(
                        "evaluate.metrics",
                        f"{metric} is not a metric of model.task: {m.task}; allowed: "
                        f"{', '.join(sorted(allowed))}",
                    )
                )
        if "exact_match" in recipe.evaluate.metrics and d.format != "instruction":
            problems.append(
                Problem(
                    "evaluate.metrics",
                    "exact_match needs data.format: instruction (a prompt and a reference "
                    "output per row)",
                )
            )
    if d.split.validation + d.split.test >= 1:
        problems.append(
            Problem(
                "data.split",
                f"validation + test fractions must sum below 1 "
                f"(got {d.split.validation} + {d.split.test})",
            )
        )
    for key in ("eval_every",):
        value = getattr(t, key)
        if isinstance(value, int) and value <= 0:
            problems.append(
                Problem(f"train.{key}", f"must be 'epoch' or a positive integer (got {value})")
            )
    every = recipe.checkpoint.every
    if isinstance(every, int) and every <= 0:
        problems.append(
            Problem("checkpoint.every", f"must be 'epoch' or a positive integer (got {every})")
        )
    metric = recipe.checkpoint.metric
    if metric is not None:
        known = reported_metrics(recipe)
        if metric not in known:
            problems.append(
                Problem(
                    "checkpoint.metric",
                    f"{metric!r} is not reported by this run (model.task: {m.task}); choose "
                    f"one of {', '.join(sorted(known))} or null",
                )
            )
    problems += scaling_problems(recipe)
    if recipe.generate is not None and m.task != "causal_lm":
        problems.append(Problem("generate", "generation needs model.task: causal_lm"))
    if s.name == "fsdp" and s.offload == "optimizer":
        problems.append(
            Problem(
                "strategy.offload",
                "fsdp offloads parameters and optimizer together: use all or none",
            )
        )
    gpu = recipe.scaling.use_gpu
    if s.mixed_precision in ("fp16", "bf16") and gpu is False and s.mixed_precision == "fp16":
        problems.append(
            Problem(
                "strategy.mixed_precision",
                "fp16 needs GPUs (scaling.use_gpu is false); use no or bf16",
            )
        )
    if m.dtype == "float16" and gpu is False:
        problems.append(
            Problem("model.dtype", "float16 weights need GPUs; use float32 or bfloat16 on CPU")
        )
    if s.offload != "none" and s.name == "deepspeed" and s.zero_stage == 0:
        problems.append(Problem("strategy.offload", "needs zero_stage 1, 2 or 3 (got 0)"))
    if recipe.cluster.target == "ray" and not recipe.cluster.address:
        problems.append(
            Problem("cluster.address", "required for cluster.target: ray (http://head:8265)")
        )
    if recipe.distill is not None:
        dist = recipe.distill
        if dist.init_student_from_teacher is not None:
            layers = dist.init_student_from_teacher
            if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                problems.append(
                    Problem(
                        "distill.init_student_from_teacher",
                        "must be a non-empty list of distinct teacher layer indices >= 0",
                    )
                )
    if t.adversarial is not None and s.name != "ddp":
        problems.append(
            Problem(
                "train.adversarial",
                f"FGM perturbs full embedding weights, which {s.name} shards; use strategy.name: ddp",
            )
        )
    if t.adversarial is not None and recipe.finetune.method != "full":
        problems.append(
            Problem(
                "train.adversarial",
                "FGM moves the input embeddings along their gradient, which finetune.method "
                f"{recipe.finetune.method} freezes; use finetune.method: full",
            )
        )
    if s.name == "deepspeed" and s.deepspeed_config:
        problems += [Problem("", message) for message in check_deepspeed_overrides(recipe)]
    if recipe.finetune.method == "qlora":
        problems += qlora_problems(recipe)
    return problems


def scaling_problems(recipe: Recipe) -> list[Problem]:
    """An elastic range must be a range, and the run must be allowed to restart: Ray Train
    replaces the worker group on a lost node, which counts against train.max_failures."""
    s = recipe.scaling
    if isinstance(s.num_workers, int):
        return []
    low, high = s.num_workers
    shown = f"[{low}, {high}]"
    if low < 1:
        return [Problem("scaling.num_workers", f"[min, max] needs min >= 1 (got {shown})")]
    if low > high:
        return [Problem("scaling.num_workers", f"[min, max] needs min <= max (got {shown})")]
    if s.elastic and recipe.train.max_failures == 0:
        return [
            Problem(
                "train.max_failures",
                f"an elastic run (scaling.num_workers: {shown}) goes on after a lost node by "
                "restarting its workers, which counts as a failure: allow some (e.g. 3, or -1 "
                "for no limit)",
            )
        ]
    return []


def qlora_problems(recipe: Recipe) -> list[Problem]:
    """What a 4-bit base cannot be combined with (see the QLoRA section of the README)."""
    problems = []
    s = recipe.strategy
    if s.name == "deepspeed" and s.zero_stage != 3:
        problems.append(
            Problem(
                "strategy.zero_stage",
                f"finetune.method qlora with deepspeed runs with zero_stage: 3 (got "
                f"{s.zero_stage}): ZeRO 0-2 keep the whole 4-bit base on every worker and "
                "partition only the optimizer state of the few LoRA weights; use zero_stage: 3 "
                "to partition the base, or strategy.name: ddp",
            )
        )
    if s.name in ("fsdp", "deepspeed") and s.offload != "none":
        problems.append(
            Problem(
                "strategy.offload",
                f"finetune.method qlora with {s.name} runs with offload: none (got "
                f"{s.offload}): " + QLORA_OFFLOAD_REASON,
            )
        )
    if s.name == "deepspeed":
        zero = s.deepspeed_config.get("zero_optimization")
        for key in ("offload_param", "offload_optimizer"):
            if isinstance(zero, dict) and key in zero:
                problems.append(
                    Problem(
                        f"strategy.deepspeed_config.zero_optimization.{key}",
                        "finetune.method qlora runs without offload: " + QLORA_OFFLOAD_REASON,
                    )
                )
    if recipe.model.gguf_file:
        problems.append(
            Problem(
                "model.gguf_file",
                "finetune.method qlora quantizes safetensors weights on load; a GGUF file "
                "is already quantized in its own format: use the original checkpoint",
            )
        )
    if recipe.distill is not None:
        problems.append(
            Problem(
                "distill",
                "finetune.method qlora cannot be distilled into (a 4-bit student is not "
                "supported); use finetune.method lora",
            )
        )
    return problems


QLORA_OFFLOAD_REASON = (
    "the 4-bit base is a quarter of the bf16 weights and already sharded, and the optimizer "
    "holds only the LoRA weights; offloading them is not supported"
)


MAX_REPAIR_ROUNDS = 8


def _repaired_recipe(data: Any, errors: list[Any]) -> Recipe | None:
    """A Recipe built from the data with every schema error taken out, or None.

    Invalid values are removed (their defaults apply) and missing required fields get
    placeholders, so the cross-field rules can still check everything else and all problems
    are reported in one go.
    """
    data = copy.deepcopy(data)
    for _ in range(MAX_REPAIR_ROUNDS):
        if not isinstance(data, dict) or not any(_repair(data, err) for err in errors):
            return None
        try:
            return Recipe.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
    return None


def _repair(data: dict, err: Any) -> bool:
    """Take one schema error out of `data`; whether anything changed."""
    loc = clean_loc(tuple(err["loc"]), data)
    if any(isinstance(p, int) for p in loc):
        # Inside a list: drop the whole list-valued field rather than shifting positions.
        loc = loc[: next(i for i, p in enumerate(loc) if isinstance(p, int))]
    if not loc:
        return False
    parent: Any = data
    for part in loc[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
        return False
    key = loc[-1]
    if err["type"] == "missing":
        if key in parent:
            return False
        info = field_at(loc)
        section = section_type(info.annotation) if info is not None else None
        parent[key] = {} if section is not None else "placeholder"
        return True
    if key not in parent:
        return False
    del parent[key]
    return True


_FIELD_MENTION = re.compile(r"\b[a-z_]+(?:\.[a-z_]+)+\b")


def _follows_from(rule: Problem, schema_paths: set[str]) -> bool:
    """Whether a rule problem may only be a consequence of a field the schema rejected."""
    mentioned = {rule.path, *_FIELD_MENTION.findall(rule.message)}
    return any(
        m == s or m.startswith(s + ".") or s.startswith(m + ".")
        for m in mentioned
        for s in schema_paths
    )


def validate_data(
    data: Mapping[str, Any], doc: Doc | None = None, source: str | None = None
) -> Recipe:
    """Validate plain recipe data (after bases and overrides) into a Recipe.

    Raises RecipeError with every problem, schema and cross-field rules alike, in file order.
    """
    doc = doc or Doc(dict(data) if isinstance(data, Mapping) else data, {})
    try:
        try:
            recipe = Recipe.model_validate(doc.data)
            problems: list[Problem] = []
        except ValidationError as exc:
            problems = problems_from_validation(exc, doc)
            recipe = _repaired_recipe(doc.data, exc.errors(include_url=False))
        rules = check_rules(recipe) if recipe is not None else []
    except RecursionError:
        raise RecipeError([Problem("", "recipe nested too deeply")], source) from None
    schema_paths = {re.sub(r"\[\d+\].*", "", p.path) for p in problems}
    problems += [
        Problem(p.path, p.message, p.where or mark_for(doc.marks, tuple(p.path.split("."))))
        for p in rules
        if not _follows_from(p, schema_paths)
    ]
    if problems:
        raise RecipeError(sort_problems(problems), source)
    return recipe
