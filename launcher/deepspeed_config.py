"""The DeepSpeed config a recipe asks for, and the check of raw DeepSpeed keys against it.

The launcher generates every DeepSpeed key the recipe decides (batch sizes, optimizer, ZeRO stage,
offload, precision); `strategy.deepspeed_config` may add keys but never contradict a generated
one. Both the generation and that check are plain data, without torch, so `ftlaunch validate`
reports a contradiction before anything heavy is imported.

Functions take a launcher.recipe.Recipe; it is not imported because the recipe package sits a
layer above this module (its rules call `check_deepspeed_overrides`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from launcher.errors import BadInputError

RecipeLike = Any  # a launcher.recipe.Recipe (see the module docstring)

# One generated leaf: (path in the DeepSpeed config, value, recipe field that decides it, the
# field's value as shown in a conflict message).
Entry = tuple[tuple[str, ...], Any, str, Any]


class DeepSpeedConfigError(BadInputError, ValueError):
    """strategy.deepspeed_config contradicts the recipe (bad input: the CLI exits with 2)."""


def mixed_precision_name(choice: str, device_type: str, gpu_has_bf16: Callable[[], bool]) -> str:
    """The compute precision strategy.mixed_precision gives on a device: bf16, fp16 or no.

    auto: bf16 on GPUs that support it (asked through `gpu_has_bf16` only then), fp32 elsewhere,
    CPU included. An explicit bf16 is honoured on CPU too; fp16 needs a GPU (ValueError).
    """
    if choice == "no":
        return "no"
    if choice == "auto":
        return "bf16" if device_type == "cuda" and gpu_has_bf16() else "no"
    if choice == "fp16" and device_type != "cuda":
        raise ValueError("strategy.mixed_precision: fp16 needs a GPU; use no or bf16 on CPU")
    return choice


def _gpu_has_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _generated_entries(
    recipe: RecipeLike, world_size: int, precision: str, device_type: str
) -> list[Entry]:
    """(DeepSpeed key path, value, recipe field, recipe value) for every generated leaf.

    `precision` "unknown" (validation with mixed_precision auto) leaves bf16/fp16 out.
    """
    t, s = recipe.train, recipe.strategy
    entries: list[Entry] = [
        (("train_micro_batch_size_per_gpu",), t.batch_size, "train.batch_size", t.batch_size),
        (("gradient_accumulation_steps",), t.grad_accum, "train.grad_accum", t.grad_accum),
        (
            ("train_batch_size",),
            t.batch_size * t.grad_accum * world_size,
            "train.batch_size x train.grad_accum x workers",
            f"{t.batch_size} x {t.grad_accum} x {world_size}",
        ),
        (
            ("gradient_clipping",),
            t.max_grad_norm or 0.0,
            "train.max_grad_norm",
            t.max_grad_norm,
        ),
        (("optimizer", "type"), "AdamW", "the launcher's optimizer", "AdamW"),
        (("optimizer", "params", "lr"), t.lr, "train.lr", t.lr),
        (("optimizer", "params", "betas"), list(t.betas), "train.betas", list(t.betas)),
        (
            ("optimizer", "params", "weight_decay"),
            t.weight_decay,
            "train.weight_decay",
            t.weight_decay,
        ),
        (("zero_optimization", "stage"), s.zero_stage, "strategy.zero_stage", s.zero_stage),
    ]
    if device_type == "cpu":
        # Without an accelerator DeepSpeed's fused/CPU Adam kernels would need a C++ build; torch's
        # AdamW does the same update (and the same math as the ddp and fsdp strategies).
        entries.append((("optimizer", "params", "torch_adam"), True, "a run without GPUs", "cpu"))
    if s.offload in ("optimizer", "all"):
        entries.append(
            (
                ("zero_optimization", "offload_optimizer", "device"),
                "cpu",
                "strategy.offload",
                s.offload,
            )
        )
    if s.offload == "all":
        entries.append(
            (("zero_optimization", "offload_param", "device"), "cpu", "strategy.offload", "all")
        )
    if s.zero_stage == 3:
        # Saving the model from rank 0 needs the partitioned weights gathered.
        entries.append(
            (
                ("zero_optimization", "stage3_gather_16bit_weights_on_model_save"),
                True,
                "strategy.zero_stage",
                3,
            )
        )
    if precision != "unknown":
        shown = f"{s.mixed_precision} ({precision})" if s.mixed_precision == "auto" else precision
        entries.append(
            (("bf16", "enabled"), precision == "bf16", "strategy.mixed_precision", shown)
        )
        entries.append(
            (("fp16", "enabled"), precision == "fp16", "strategy.mixed_precision", shown)
        )
    return entries


def _nested(entries: list[Entry]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value, _, _ in entries:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _lookup(config: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _same(generated: Any, given: Any) -> bool:
    if isinstance(generated, bool) or isinstance(given, bool):
        return generated is given or generated == given
    if isinstance(generated, (int, float)) and isinstance(given, (int, float)):
        return math.isclose(float(generated), float(given), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(generated, (list, tuple)) and isinstance(given, (list, tuple)):
        return len(generated) == len(given) and all(map(_same, generated, given))
    if isinstance(generated, str) and isinstance(given, str):
        return generated.lower() == given.lower()
    return generated == given


def _override_conflicts(recipe: RecipeLike, entries: list[Entry]) -> list[str]:
    overrides = recipe.strategy.deepspeed_config
    problems = []
    for path, value, field, field_value in entries:
        present, given = _lookup(overrides, path)
        if present and not _same(value, given):
            key = ".".join(path)
            problems.append(
                f"strategy.deepspeed_config.{key}: {given!r} contradicts {field}: {field_value}"
                f" (which gives {value!r}); change {field} instead"
            )
    if "scheduler" in overrides:
        problems.append(
            "strategy.deepspeed_config.scheduler: "
            f"{overrides['scheduler']!r} contradicts train.scheduler: {recipe.train.scheduler} "
            f"with train.warmup_ratio: {recipe.train.warmup_ratio}; the schedule is set there"
        )
    s = recipe.strategy
    if s.offload == "all" and s.zero_stage != 3:
        problems.append(
            f"strategy.offload: all offloads parameters, which needs strategy.zero_stage: 3 "
            f"(got {s.zero_stage}); use offload: optimizer"
        )
    return problems


def check_deepspeed_overrides(recipe: RecipeLike) -> list[str]:
    """Contradictions between strategy.deepspeed_config and the recipe, for validation time.

    Empty for non-deepspeed recipes. With mixed_precision auto the device is not known yet, so
    bf16/fp16 keys are checked only when scaling.use_gpu is false or precision is explicit.
    """
    if recipe.strategy.name != "deepspeed":
        return []
    gpu = recipe.scaling.use_gpu
    device_type = "cpu" if gpu is False else "cuda"
    precision = "unknown"
    choice = recipe.strategy.mixed_precision
    if choice != "auto" or gpu is False:
        with contextlib.suppress(ValueError):  # fp16 on CPU is reported by the recipe rules
            precision = mixed_precision_name(choice, device_type, _gpu_has_bf16)
    problems: list[str] = []
    # An elastic run trains at every size of its range: an override must hold at each end.
    for workers in dict.fromkeys((recipe.scaling.min_workers, recipe.scaling.max_workers)):
        entries = _generated_entries(recipe, workers, precision, device_type)
        if gpu == "auto":
            entries = [e for e in entries if e[0] != ("optimizer", "params", "torch_adam")]
        problems += [p for p in _override_conflicts(recipe, entries) if p not in problems]
    return problems


def deepspeed_config(recipe: RecipeLike, world_size: int, device: Any = "cpu") -> dict[str, Any]:
    """The DeepSpeed config for this recipe: generated keys, then strategy.deepspeed_config.

    `device` is a torch.device or its name ("cpu", "cuda:0"). Raises DeepSpeedConfigError naming
    both values when an override contradicts the recipe. The lr schedule is not in it: the
    launcher passes its own schedule to DeepSpeed so that every strategy follows exactly the same
    curve (DeepSpeed's WarmupLR forces >= 2 warmup steps).
    """
    device_type = getattr(device, "type", None) or str(device).split(":", 1)[0]
    precision = mixed_precision_name(recipe.strategy.mixed_precision, device_type, _gpu_has_bf16)
    entries = _generated_entries(recipe, world_size, precision, device_type)
    problems = _override_conflicts(recipe, entries)
    if problems:
        raise DeepSpeedConfigError("; ".join(problems))
    generated = _nested(entries)
    generated["optimizer"]["params"]["eps"] = 1e-8
    generated["steps_per_print"] = 10**9  # the training loop reports metrics itself
    generated["wall_clock_breakdown"] = False
    return _merge(generated, recipe.strategy.deepspeed_config)
